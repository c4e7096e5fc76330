"""Discrete-event simulation of a :class:`~klotski.schedule.Schedule` on a hardware profile.

Rules: each stream runs its ops in issue order, one at a time; an op starts when its stream is free, its
dependencies have finished and, for a copy, its link (h2d / d2h / disk) is free, for a compute op on the host, the
CPU is free (the attention and cold-expert lanes each use all its cores, so they take turns). When a link or the
CPU frees, the waiting op of the most urgent stream goes first (:data:`LINK_PRIORITY`: KV and attention
activations, then post-gate expert loads, then prefetches), then the earliest ready, then issue order. A copy is
never preempted, but an urgent copy (KV, the host attention lane's activations: priority :data:`URGENT`) does
not wait for a weight copy in flight: it runs on its own stream, which a second copy engine serves beside the
first (GPUs have two or more per direction), and the bandwidth it takes delays the link's next copy by its own
duration (the link's busy time is conserved; only who waits changes). In CPU mode every lane runs on the
host's cores: an op that starts while another stream runs pays its fixed costs times ``1 + hw.contention``
(0 unless a calibration fitted it; ``klotski.calibration.fit_kind_costs``). Memory: ``mem_alloc`` is taken
at an op's start, ``mem_free`` returned at its end (frees before allocations at the same instant), on top of
the schedule's static memory. Result: makespan, busy time per stream, bubble fraction of the compute stream,
peak memory per tier, and every op's start / finish (for traces).

:func:`simulate_model_step` simulates a window of the first layers and extrapolates the rest when the
window has reached a periodic steady state of every stream, not only compute (checked; otherwise it simulates
more layers, up to all).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from klotski.costs import op_timer
from klotski.schedule import COMPUTE_KINDS, TIERS, Op, Schedule, build_schedule


LINK_PRIORITY = {"kv_load": 0, "kv_store": 0, "cpu_attn": 0, "cpu_experts": 1, "expert_io": 1, "prefetch": 2}
URGENT = 0  # copies of this priority (KV, attention activations) do not wait for a busy link (see the module doc)


HOST_CPU = "cpu"  # the shared resource of compute ops on the host (both host lanes use all its cores)
DEVICE = "gpu"  # the device's compute (for the roofline: every device compute op, whatever its stream)


def _resource(op: Op) -> str | None:
    """The shared resource ``op`` holds while it runs besides its stream: a copy its link (``h2d`` / ``d2h`` /
    ``disk``), a compute op on the host the CPU (:data:`HOST_CPU`), anything else none."""
    if op.link is not None:
        return op.link
    if op.device == "cpu" and op.kind != "release":
        return HOST_CPU
    return None


def _roofline_resource(op: Op) -> str | None:
    """The resource whose busy time ``op`` adds to in the roofline: its shared resource, or the device for a
    compute op on the device."""
    res = _resource(op)
    if res is None and op.kind in COMPUTE_KINDS:
        return DEVICE
    return res


@dataclass
class SimResult:
    makespan: float
    busy: dict  # stream -> seconds busy
    peak_mem: dict  # tier -> peak bytes (static + dynamic)
    start: list = field(default_factory=list)  # per op id
    finish: list = field(default_factory=list)
    bytes_moved: dict = field(default_factory=dict)  # link -> bytes
    layers_simulated: int = 0
    resource_busy: dict = field(default_factory=dict)  # resource (h2d, d2h, disk, cpu, gpu) -> seconds busy
    contended: dict = field(default_factory=dict)  # op id -> seconds another lane beside it added (CPU mode)

    @property
    def roofline(self) -> float:
        """The step's bound when every resource overlaps perfectly: the busiest resource's seconds (the
        analytic side of the simulation; the makespan adds what dependencies keep from overlapping)."""
        return max(self.resource_busy.values(), default=0.0)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the compute stream over the makespan."""
        if self.makespan <= 0:
            return 0.0
        return max(0.0, 1.0 - self.busy.get("compute", 0.0) / self.makespan)


def simulate(schedule: Schedule, hw=None, duration: Callable[[Op], float] | None = None,
             dtype: str | None = None) -> SimResult:
    """Run ``schedule``; op durations from ``duration(op)`` or the cost model on ``hw``."""
    ops = schedule.ops
    beside_lane: list[float] | None = None  # CPU mode: an op's extra seconds while another lane runs
    if duration is None:
        if hw is None:
            raise ValueError("simulate: give a hardware profile or a duration function")
        duration = op_timer(hw, dtype or "bfloat16")
        if hw.device == "cpu" and hw.contention > 0:
            beside_lane = [float(duration(op, 1.0)) for op in ops]
    dur = [float(duration(op)) for op in ops]
    if beside_lane is not None:  # a schedule's ops are priced alone (contended 0): the difference is the lane's
        beside_lane = [b - d for b, d in zip(beside_lane, dur)]
    n = len(ops)
    start = [0.0] * n
    finish = [0.0] * n
    pending = [0] * n
    succ: list[list[int]] = [[] for _ in range(n)]
    names: dict[str, int] = {}  # stream -> index
    op_stream = [0] * n
    queues: list[list[int]] = []
    prio = [4] * n
    link: list[str | None] = [None] * n  # the shared resource an op holds while it runs (None: none, or no time)
    busy: dict[str, float] = {}
    held: dict[str, float] = {}
    moved: dict[str, int] = {}
    for op, d in zip(ops, dur):
        oid = op.id
        deps = op.deps
        if deps:
            pending[oid] = len(deps)
            for dep in deps:
                if dep >= oid:
                    raise ValueError(f"op {oid} ({op.kind}) depends on a later op {dep}: deps must point backwards")
                succ[dep].append(oid)
        stream = op.stream
        si = names.get(stream)
        if si is None:
            si = names[stream] = len(queues)
            queues.append([])
            busy[stream] = 0.0
        op_stream[oid] = si
        queues[si].append(oid)
        prio[oid] = LINK_PRIORITY.get(stream, 4)
        busy[stream] += d
        if op.link is not None:
            moved[op.link] = moved.get(op.link, 0) + op.bytes
        if d > 0:
            res = link[oid] = _resource(op)
            if res is None and op.kind in COMPUTE_KINDS:
                res = DEVICE
            if res is not None:  # the roofline's busy time per resource (_add_held)
                held[res] = held.get(res, 0.0) + d
    head = [0] * len(queues)
    stream_free = [0.0] * len(queues)
    link_free: dict[str, float] = {}
    ready_at = [0.0] * n  # max finish of deps
    heap: list[tuple[float, int, float, int]] = []  # (time, priority, ready time, op id)
    queued = [False] * n
    contended: dict[int, float] = {}  # op id -> seconds added by the lanes beside it
    push, pop = heapq.heappush, heapq.heappop

    def consider(si: int) -> None:
        i = head[si]
        q = queues[si]
        if i < len(q):
            oid = q[i]
            if pending[oid] == 0 and not queued[oid]:
                queued[oid] = True
                t = max(stream_free[si], ready_at[oid])
                push(heap, (t, prio[oid], t, oid))

    for si in range(len(queues)):
        consider(si)
    done = 0
    while heap:
        t, p, ready, oid = pop(heap)
        lk = link[oid]
        beside = False  # an urgent copy running beside the copy in flight on its link
        if lk is not None:
            t_link = link_free.get(lk, 0.0)
            if t_link > t:
                if p != URGENT or lk == HOST_CPU:
                    push(heap, (t_link, p, ready, oid))
                    continue
                beside = True
        si = op_stream[oid]
        if beside_lane is not None and beside_lane[oid] > 0 and any(
                free > t for j, free in enumerate(stream_free) if j != si):
            dur[oid] += beside_lane[oid]  # another lane runs on the same cores as it starts (CPU mode)
            contended[oid] = beside_lane[oid]
        start[oid] = t
        f = finish[oid] = t + dur[oid]
        if lk is not None:
            link_free[lk] = link_free[lk] + dur[oid] if beside else f
        stream_free[si] = f
        head[si] += 1
        done += 1
        for s_id in succ[oid]:
            pending[s_id] -= 1
            if f > ready_at[s_id]:
                ready_at[s_id] = f
            if pending[s_id] == 0:
                sj = op_stream[s_id]
                if queues[sj][head[sj]] == s_id and not queued[s_id]:  # consider(sj), inlined: the hot path
                    queued[s_id] = True
                    tj = max(stream_free[sj], ready_at[s_id])
                    push(heap, (tj, prio[s_id], tj, s_id))
        i = head[si]  # consider(si), inlined: the stream's next op (its stream frees at f)
        q = queues[si]
        if i < len(q):
            nxt = q[i]
            if pending[nxt] == 0 and not queued[nxt]:
                queued[nxt] = True
                tn = max(f, ready_at[nxt])
                push(heap, (tn, prio[nxt], tn, nxt))
    for oid, extra in contended.items():
        busy[ops[oid].stream] += extra
        _add_held(held, ops[oid], extra)
    if done != n:
        stuck = [q[head[si]] for si, q in enumerate(queues) if head[si] < len(q)]
        raise ValueError(f"schedule deadlocks: ops {stuck[:5]} wait on dependencies that never run "
                         f"(a dependency is queued behind its dependant on the same stream)")
    return SimResult(makespan=max(finish, default=0.0), busy=busy, peak_mem=_peak_memory(schedule, start, finish),
                     start=start, finish=finish, bytes_moved=moved, layers_simulated=schedule.num_layers,
                     resource_busy=held, contended=contended)


def _add_held(held: dict, op: Op, seconds: float) -> None:
    res = _roofline_resource(op)
    if res is not None and seconds > 0:
        held[res] = held.get(res, 0.0) + seconds


def _peak_memory(schedule: Schedule, start: list, finish: list) -> dict:
    events: dict[str, tuple[list, list]] = {tier: ([], []) for tier in TIERS}  # tier -> (times, deltas)
    for op in schedule.ops:
        if op.mem_alloc:
            for tier, a in op.mem_alloc.items():
                if a:
                    ev = events.setdefault(tier, ([], []))
                    ev[0].append(start[op.id]); ev[1].append(a)
        if op.mem_free:
            for tier, f in op.mem_free.items():
                if f:
                    ev = events.setdefault(tier, ([], []))
                    ev[0].append(finish[op.id]); ev[1].append(-f)
    peaks = {}
    for tier in TIERS:
        times, deltas = events[tier]
        dyn = 0
        if times:
            t, d = np.asarray(times), np.asarray(deltas, dtype=np.int64)
            order = np.lexsort((d, t))  # by time, frees (negative) first
            dyn = int(max(0, np.cumsum(d[order]).max()))
        peaks[tier] = schedule.static_mem.get(tier, 0) + dyn
    return peaks


def simulate_model_step(policy, costs, placement, shape, hw, routing=None, num_hot=None, overlap=True,
                        window: int | None = None, dtype: str | None = None, dense_buffers: int | None = None,
                        expert_slots: int | None = None, host=None, expert_rule=None) -> SimResult:
    """Simulate one step of the whole model; a window of layers plus exact extrapolation when periodic.

    Layers after the last change of layer kind are identical; the window covers the first layers up to that
    point plus ``window`` more. If the finish times of three layers before the window's last (one to three layers
    before it: the model's end reaches back as far as the prefetch runs ahead) are evenly spaced the pipeline is
    periodic (and every stream's last finish per layer keeps that period: a prefetch stream that still runs
    further ahead each layer holds more weights each layer) and the remaining layers each add one period (and
    their ops' busy time); otherwise the window doubles, up to the whole model.

    ``host`` (:class:`klotski.program.host.HostCompute`): attention per phase and cold experts on the CPU, each on
    its own lane; with ``experts="auto"`` the decision rule is ``expert_rule`` (default: on ``hw``).
    """
    L = costs.num_layers
    kinds = [lc.kind for lc in costs.layers]
    first_uniform = max((i for i in range(1, L) if kinds[i] != kinds[i - 1]), default=0)
    dtype = dtype or costs.act_dtype
    if host is not None and host.experts == "auto" and expert_rule is None:
        from klotski.program.host import ExpertRule

        expert_rule = ExpertRule(costs, hw, dtype)
    # a period of one layer needs 4 layers in the window (5 when the end reaches two layers back, as klotski's
    # prefetch often does), of two layers (flexgen's buffers) 6
    w = window or (6 if policy == "flexgen" else 5)
    while True:
        span = min(L, first_uniform + w)
        if (L - span) % 2:
            span += 1  # extrapolate an even number of layers: periods of one or two layers both divide it
        sched = build_schedule(policy, costs, placement, shape, routing, num_hot=num_hot, overlap=overlap,
                               num_layers=span, dense_buffers=dense_buffers, expert_slots=expert_slots, host=host,
                               expert_rule=expert_rule)
        res = simulate(sched, hw, dtype=dtype)
        if span == L:
            return res
        c = [res.finish[i] for i in sched.layer_last_compute]
        # every stream's last finish per layer (prefetches may run ahead of a periodic compute stream and keep
        # more weights in flight layer after layer: then the window's peak memory is not the model's). Releases
        # are left out: they take no time and follow the copies / computes checked here
        last: dict = {}
        for op, f in zip(sched.ops, res.finish):
            if op.layer < span and op.kind != "release":
                row = last.get(op.stream)
                if row is None:
                    row = last[op.stream] = {}
                if f > row.get(op.layer, -1.0):
                    row[op.layer] = f
        # the window's last layer has no successor (like the model's last), and that reaches back (klotski's
        # prefetch for it is issued a layer or two earlier): steady state is looked for one to three layers
        # before the window's end, among the uniform layers
        for margin in (1, 2, 3):
            for period in (1, 2):  # flexgen's two weight buffers alternate: a period of two layers
                layers = tuple(span - 1 - margin - k * period for k in (2, 1, 0))
                if layers[0] < first_uniform:
                    continue
                a, b, d = (c[i] for i in layers)
                if abs((d - b) - (b - a)) > 1e-9 * max(1.0, abs(d - b)) + 1e-12:
                    continue
                if all(_same_period([row.get(i) for i in layers], (d - b)) for row in last.values()
                       if any(i in row for i in layers)):
                    return _extrapolate(sched, res, hw, dtype, L - span, (d - b) / period, layers[2], period)
        w *= 2


def _same_period(times: list, step: float) -> bool:
    """Whether three per-layer times are evenly spaced by ``step`` (None: a layer without such ops)."""
    if None in times:
        return False
    a, b, d = times
    tol = 1e-9 * max(1.0, abs(step)) + 1e-12
    return abs((d - b) - step) <= tol and abs((b - a) - step) <= tol


def _extrapolate(sched: Schedule, res: SimResult, hw, dtype: str, extra: int, period: float, steady: int,
                 period_layers: int) -> SimResult:
    """``res`` with ``extra`` more layers of ``period`` seconds each: each adds the last layer's ops' busy time
    and bytes, and the contention (CPU mode) the ``period_layers`` layers of one period up to the periodic layer
    ``steady`` paid per layer (the window's last layer, with nothing after it, has less company)."""
    last = sched.num_layers - 1
    busy = dict(res.busy)
    held = dict(res.resource_busy)
    moved = dict(res.bytes_moved)
    seconds_of = op_timer(hw, dtype)
    for op in sched.ops:
        if op.layer == last:
            seconds = extra * seconds_of(op)
            busy[op.stream] = busy.get(op.stream, 0.0) + seconds
            _add_held(held, op, seconds)
            if op.link is not None:
                moved[op.link] = moved.get(op.link, 0) + extra * op.bytes
        added = res.contended.get(op.id)
        if added and steady - period_layers < op.layer <= steady:
            busy[op.stream] += extra * added / period_layers
            _add_held(held, op, extra * added / period_layers)
    return SimResult(makespan=res.makespan + extra * period, busy=busy, peak_mem=res.peak_mem, start=res.start,
                     finish=res.finish, bytes_moved=moved, layers_simulated=sched.num_layers, resource_busy=held,
                     contended=res.contended)
