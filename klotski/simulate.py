"""Discrete-event simulation of a :class:`~klotski.schedule.Schedule` on a hardware profile.

Rules: each stream runs its ops in issue order, one at a time; an op starts when its stream is free, its
dependencies have finished and, for a copy, its link (h2d / d2h / disk) is free; when a link frees, the
waiting copy of the most urgent stream goes first (:data:`LINK_PRIORITY`: KV loads, then post-gate expert
loads, then prefetches; like CUDA stream priorities), then the earliest ready, then issue order. A copy
is never preempted. Memory: ``mem_alloc`` is taken at an op's
start, ``mem_free`` returned at its end (frees before allocations at the same instant), on top of the
schedule's static memory. Result: makespan, busy time per stream, bubble fraction of the compute stream,
peak memory per tier, and every op's start / finish (for traces).

:func:`simulate_model_step` simulates a window of the first layers and extrapolates the rest when the
window has reached a periodic steady state (checked; otherwise it simulates more layers, up to all).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from klotski.costs import op_seconds
from klotski.schedule import TIERS, Op, Schedule, build_schedule


LINK_PRIORITY = {"kv_load": 0, "kv_store": 0, "expert_io": 1, "prefetch": 2, "disk": 3}


@dataclass
class SimResult:
    makespan: float
    busy: dict  # stream -> seconds busy
    peak_mem: dict  # tier -> peak bytes (static + dynamic)
    start: list = field(default_factory=list)  # per op id
    finish: list = field(default_factory=list)
    bytes_moved: dict = field(default_factory=dict)  # link -> bytes
    layers_simulated: int = 0

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
    if duration is None:
        if hw is None:
            raise ValueError("simulate: give a hardware profile or a duration function")
        dtype = dtype or "bfloat16"
        duration = lambda op: op_seconds(op, hw, dtype)  # noqa: E731
    dur = [float(duration(op)) for op in ops]
    n = len(ops)
    start = [0.0] * n
    finish = [0.0] * n
    pending = [len(op.deps) for op in ops]
    succ: list[list[int]] = [[] for _ in range(n)]
    for op in ops:
        for d in op.deps:
            if d >= op.id:
                raise ValueError(f"op {op.id} ({op.kind}) depends on a later op {d}: deps must point backwards")
            succ[d].append(op.id)
    queues: dict[str, list[int]] = {}
    for op in ops:
        queues.setdefault(op.stream, []).append(op.id)
    head = {s: 0 for s in queues}
    stream_free = {s: 0.0 for s in queues}
    link_free: dict[str, float] = {}
    ready_at = [0.0] * n  # max finish of deps
    heap: list[tuple[float, int, float, int]] = []  # (time, priority, ready time, op id)
    prio = [LINK_PRIORITY.get(op.stream, 4) for op in ops]
    uses_link = [op.link is not None and d > 0 for op, d in zip(ops, dur)]
    queued = [False] * n

    def consider(stream: str) -> None:
        i = head[stream]
        q = queues[stream]
        if i < len(q) and pending[q[i]] == 0 and not queued[q[i]]:
            oid = q[i]
            queued[oid] = True
            t = max(stream_free[stream], ready_at[oid])
            heapq.heappush(heap, (t, prio[oid], t, oid))

    for s in queues:
        consider(s)
    done = 0
    while heap:
        t, p, ready, oid = heapq.heappop(heap)
        op = ops[oid]
        if uses_link[oid]:
            t_link = link_free.get(op.link, 0.0)
            if t_link > t:
                heapq.heappush(heap, (t_link, p, ready, oid))
                continue
        start[oid] = t
        finish[oid] = t + dur[oid]
        if uses_link[oid]:
            link_free[op.link] = finish[oid]
        stream_free[op.stream] = finish[oid]
        head[op.stream] += 1
        done += 1
        for s_id in succ[oid]:
            pending[s_id] -= 1
            if finish[oid] > ready_at[s_id]:
                ready_at[s_id] = finish[oid]
            if pending[s_id] == 0 and queues[ops[s_id].stream][head[ops[s_id].stream]] == s_id:
                consider(ops[s_id].stream)
        consider(op.stream)
    if done != n:
        stuck = [queues[s][head[s]] for s in queues if head[s] < len(queues[s])]
        raise ValueError(f"schedule deadlocks: ops {stuck[:5]} wait on dependencies that never run "
                         f"(a dependency is queued behind its dependant on the same stream)")
    busy: dict[str, float] = {}
    moved: dict[str, int] = {}
    for op, d in zip(ops, dur):
        busy[op.stream] = busy.get(op.stream, 0.0) + d
        if op.link is not None:
            moved[op.link] = moved.get(op.link, 0) + op.bytes
    return SimResult(makespan=max(finish, default=0.0), busy=busy, peak_mem=_peak_memory(schedule, start, finish),
                     start=start, finish=finish, bytes_moved=moved, layers_simulated=schedule.num_layers)


def _peak_memory(schedule: Schedule, start: list, finish: list) -> dict:
    peaks = {}
    for tier in TIERS:
        times, deltas = [], []
        for op in schedule.ops:
            a, f = op.mem_alloc.get(tier, 0), op.mem_free.get(tier, 0)
            if a:
                times.append(start[op.id]); deltas.append(a)
            if f:
                times.append(finish[op.id]); deltas.append(-f)
        dyn = 0
        if times:
            t, d = np.asarray(times), np.asarray(deltas, dtype=np.int64)
            order = np.lexsort((d, t))  # by time, frees (negative) first
            dyn = int(max(0, np.cumsum(d[order]).max()))
        peaks[tier] = schedule.static_mem.get(tier, 0) + dyn
    return peaks


def simulate_model_step(policy, costs, placement, shape, hw, routing=None, num_hot=None, overlap=True,
                        window: int | None = None, dtype: str | None = None) -> SimResult:
    """Simulate one step of the whole model; a window of layers plus exact extrapolation when periodic.

    Layers after the last change of layer kind are identical; the window covers the first layers up to that
    point plus ``window`` more. If the finish times of the window's last three layers are evenly spaced the
    pipeline is periodic and the remaining layers each add one period (and their ops' busy time);
    otherwise the window doubles, up to the whole model.
    """
    L = costs.num_layers
    kinds = [lc.kind for lc in costs.layers]
    first_uniform = max((i for i in range(1, L) if kinds[i] != kinds[i - 1]), default=0)
    dtype = dtype or costs.act_dtype
    # a period of one layer needs 4 layers in the window, of two layers (flexgen's buffers) 6
    w = window or (6 if policy == "flexgen" else 4)
    while True:
        span = min(L, first_uniform + w)
        if (L - span) % 2:
            span += 1  # extrapolate an even number of layers: periods of one or two layers both divide it
        sched = build_schedule(policy, costs, placement, shape, routing, num_hot=num_hot, overlap=overlap,
                               num_layers=span)
        res = simulate(sched, hw, dtype=dtype)
        if span == L:
            return res
        # the window's last layer has no successor (like the model's last); steady state is checked before it
        c = [res.finish[i] for i in sched.layer_last_compute]
        for period in (1, 2):  # flexgen's two weight buffers alternate: a period of two layers
            if len(c) < 2 * period + 2:
                continue
            a, b, d = c[-2 - 2 * period], c[-2 - period], c[-2]
            if abs((d - b) - (b - a)) <= 1e-9 * max(1.0, abs(d - b)) + 1e-12:
                return _extrapolate(sched, res, hw, dtype, L - span, (d - b) / period)
        w *= 2


def _extrapolate(sched: Schedule, res: SimResult, hw, dtype: str, extra: int, period: float) -> SimResult:
    last = sched.num_layers - 1
    busy = dict(res.busy)
    moved = dict(res.bytes_moved)
    for op in sched.ops:
        if op.layer == last:
            busy[op.stream] = busy.get(op.stream, 0.0) + extra * op_seconds(op, hw, dtype)
            if op.link is not None:
                moved[op.link] = moved.get(op.link, 0) + extra * op.bytes
    return SimResult(makespan=res.makespan + extra * period, busy=busy, peak_mem=res.peak_mem, start=res.start,
                     finish=res.finish, bytes_moved=moved, layers_simulated=sched.num_layers)
