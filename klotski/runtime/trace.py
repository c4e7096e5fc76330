"""Timeline of one run: spans per stream (compute, prefetch, expert_io, kv_load, kv_store, and the host's
cpu_attn / cpu_experts lanes), measured.

CPU mode: spans are wall-clock (``time.perf_counter``) around the real work. CUDA mode: a compute span is a
pair of CUDA events on the compute stream and a copy span a pair on its copy stream, resolved after the
forward synchronizes, so spans show when the GPU ran them. ``bubble_fraction`` = 1 - (union of compute
spans) / (wall time of the traced forwards). ``write_chrome`` writes Chrome/Perfetto JSON,
``write_timeline`` a PNG of the streams.

A span carries the ids of the ops it ran (``op_ids``, ``step``: what :meth:`Tracer.log_ops` last logged on its
lane) and, for compute ops, their cost as the op builder described it (``cost``: :func:`op_cost`), so
:meth:`Tracer.observations` hands calibration the same op the planner and the simulator price.
"""
from __future__ import annotations

import bisect

import json
import threading
import time

import torch

STREAMS = ("compute", "prefetch", "expert_io", "kv_load", "kv_store", "cpu_attn", "cpu_experts")


class Tracer:
    def __init__(self, device: torch.device, keep_spans: bool = True):
        self.cuda = device.type == "cuda"
        self.keep_spans = keep_spans
        self.spans: list[tuple[str, str, float, float, dict]] = []  # (stream, name, start s, end s, args)
        self._pending: list[tuple[str, str, object, object, dict]] = []  # CUDA event pairs to resolve
        self._windows: list[tuple[float, float]] = []  # traced forward wall windows
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._base_event = None
        self._base_time = 0.0
        self.compute_busy = 0.0
        self.wall = 0.0
        self.op_log: list[tuple[str, int]] | None = None  # (lane, op id) as executed; on when a list is set
        self.step = -1  # forwards traced since the last reset (a span's "step" arg: which step's op ids it ran)
        self._lane_ops: dict[str, tuple[int, ...]] = {}  # lane -> the op ids its next span runs
        self._step_ops: list | None = None  # the running step's op list (the builder's, as it grows)

    def log_ops(self, lane: str, op_ids) -> None:
        """Record that ``lane`` executes the ops ``op_ids`` now (their ids in the step's op list); the lane's next
        span carries them (args ``op_ids`` and ``step``), so a span can be paired with the ops it ran."""
        if not op_ids:
            return
        with self._lock:
            self._lane_ops[lane] = tuple(int(i) for i in op_ids)
            if self.op_log is not None:
                self.op_log.extend((lane, i) for i in op_ids)

    def bind_ops(self, ops: list) -> None:
        """The running step's op list (the builder's list, appended to as ops are built): a span that runs
        compute ops of it carries their cost description (arg ``cost``, :func:`op_cost`)."""
        with self._lock:
            self._step_ops = ops

    def _tag(self, stream_name: str, args: dict) -> dict:
        """``args`` with the op ids ``stream_name`` last logged (taken: one span per log) and, when they are
        compute ops of the bound step, what the builder said they cost (``cost``)."""
        with self._lock:
            ids = self._lane_ops.pop(stream_name, None)
            ops = self._step_ops
        if ids is None:
            return args
        args = {**args, "op_ids": ids, "step": self.step}
        if ops is not None:
            cost = op_cost([ops[i] for i in ids if i < len(ops)])
            if cost is not None:
                args["cost"] = cost
        return args

    def now(self) -> float:
        return time.perf_counter() - self._t0

    # ---- spans -----------------------------------------------------------------------------------------
    def begin(self, stream=None):
        """Start a span: a host time, or a CUDA event recorded on ``stream`` (default: current)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream) if stream is not None else ev.record()
            return ev
        return self.now()

    def end(self, stream_name: str, name: str, start, stream=None, **args) -> None:
        """End a span begun at ``start``: the end is taken first, so tagging the span is not part of it."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream) if stream is not None else ev.record()
            args = self._tag(stream_name, args)
            with self._lock:
                self._pending.append((stream_name, name, start, ev, args))
            return
        end = self.now()
        self.add(stream_name, name, start, end, **self._tag(stream_name, args))

    def add(self, stream_name: str, name: str, start: float, end: float, **args) -> None:
        with self._lock:
            if stream_name == "compute":
                self.compute_busy += max(0.0, end - start)
            if self.keep_spans:
                self.spans.append((stream_name, name, start, end, args))

    # ---- forward windows -------------------------------------------------------------------------------
    def start_window(self):
        with self._lock:
            self.step += 1
            self._lane_ops.clear()
        if self.cuda:
            torch.cuda.synchronize()
            self._base_event = torch.cuda.Event(enable_timing=True)
            self._base_event.record()
            self._base_time = self.now()
        return self.now()

    def host_span(self, stream_name: str, name: str, start: float, end: float | None = None, **args) -> None:
        """A span of host work (CPU attention, CPU experts) from ``start`` to ``end`` (:meth:`now` times; None:
        now), on the host clock whatever the device."""
        end = self.now() if end is None else end
        self.add(stream_name, name, start, end, **self._tag(stream_name, args))

    def end_window(self, start: float) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._resolve()
        end = self.now()
        with self._lock:
            self._windows.append((start, end))
            self.wall += end - start

    def _resolve(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        base = self._base_event
        for stream_name, name, s, e, args in pending:
            start = self._base_time + base.elapsed_time(s) / 1e3
            end = self._base_time + base.elapsed_time(e) / 1e3
            self.add(stream_name, name, start, end, **args)

    @property
    def windows(self) -> list[tuple[float, float]]:
        """The traced forwards' (start, end) wall windows, in :meth:`now` seconds (a copy)."""
        with self._lock:
            return list(self._windows)

    @property
    def bubble_fraction(self) -> float:
        """1 - compute busy / traced wall time (compute spans never overlap: one compute stream)."""
        return max(0.0, 1.0 - self.compute_busy / self.wall) if self.wall > 0 else 0.0

    def reset(self) -> None:
        with self._lock:
            self.spans.clear()
            self._pending.clear()
            self._windows.clear()
            self._lane_ops.clear()
            self._step_ops = None
            self.step = -1
            self.compute_busy = 0.0
            self.wall = 0.0

    def observations(self) -> list:
        """(op, measured seconds) of every traced span, as :class:`klotski.schedule.Op` s the cost model can
        time: a compute span run by the step interpreter carries the cost of the builder's ops it ran (``cost``:
        FLOPs, bytes read, kernel calls, device; on the compute stream and on the host lanes), one traced
        outside it its FLOPs (``op``, ``flops``, ``score_flops``, ``calls``); a weight load
        from disk (``tier`` "disk"/"store", serial on its lane) is a ``disk`` read of ``read_bytes`` in
        ``read_s`` seconds (the time spent waiting on the reads) and an ``h2d`` copy of all its bytes in the
        rest, as the schedule models it; one from host memory an ``h2d`` copy, KV loads / stores ``h2d`` /
        ``d2h`` copies. A compute-stream op also counts the idle time before it that no other lane explains
        (:func:`dispatch_gaps`): the runtime's own work between two ops, which the op's span does not hold.
        In CPU mode a compute op also carries the share of its span another lane ran beside it
        (``contended``, :func:`contended_shares`: every lane runs on the same cores).
        For :func:`klotski.calibration.calibrate`."""
        from klotski.schedule import Op

        out = []
        with self._lock:
            spans = list(self.spans)
            windows = list(self._windows)
        gaps = dispatch_gaps(spans, windows)
        shares = {} if self.cuda else contended_shares(spans)
        for i, (stream, name, start, end, args) in enumerate(spans):
            sec = end - start
            if sec <= 0:
                continue
            sec += gaps.get(i, 0.0)
            if "cost" in args:  # compute ops as the builder described them (on any lane)
                op = cost_op(args["cost"], stream, shares.get(i, 0.0))
            elif stream == "compute" and "op" in args:
                op = Op(0, args["op"], "compute", "gpu", 0, flops=float(args.get("flops", 0.0)),
                        score_flops=float(args.get("score_flops", 0.0)), calls=int(args.get("calls", 1)))
            elif stream in ("kv_load", "kv_store"):
                link = "h2d" if stream == "kv_load" else "d2h"
                op = Op(0, stream, stream, "gpu", 0, link=link, bytes=int(args.get("bytes", 0)))
            elif "bytes" in args:
                nbytes = int(args["bytes"])
                read_s = float(args.get("read_s", 0.0)) if args.get("tier") in ("disk", "store") else 0.0
                if read_s > 0:  # a load from disk: the read, then the copy out of the staging ring
                    read = Op(0, "read", stream, "cpu", 0, link="disk", bytes=int(args.get("read_bytes", nbytes)))
                    out.append((read, min(read_s, sec)))
                    sec -= read_s
                    if sec <= 0:
                        continue
                op = Op(0, "h2d", stream, "gpu", 0, link="h2d", bytes=nbytes)
            else:
                continue
            out.append((op, sec))
        return out

    # ---- output ----------------------------------------------------------------------------------------
    def write_chrome(self, path: str) -> None:
        """Chrome trace event format (open in chrome://tracing or ui.perfetto.dev)."""
        tids = {s: i for i, s in enumerate(STREAMS)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": s}} for s, i in tids.items()]
        for stream_name, name, start, end, args in self.spans:
            tid = tids.setdefault(stream_name, len(tids))
            events.append({"name": name, "ph": "X", "pid": 0, "tid": tid, "ts": start * 1e6,
                           "dur": max(0.0, end - start) * 1e6, "args": args})
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)

    def write_timeline(self, path: str, title: str = "") -> None:
        """A PNG: one row per stream, a bar per span (compute in blue, copies in orange)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [s for s in STREAMS if any(sp[0] == s for sp in self.spans)] or ["compute"]
        fig, ax = plt.subplots(figsize=(14, 1 + 0.6 * len(rows)))
        for y, stream_name in enumerate(rows):
            bars = [(s, max(e - s, 1e-6)) for st, _, s, e, _ in self.spans if st == stream_name]
            ax.broken_barh(bars, (y - 0.4, 0.8), color="tab:blue" if stream_name == "compute" else "tab:orange")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("seconds")
        ax.set_title(title or f"bubble fraction {self.bubble_fraction:.1%}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def dispatch_gaps(spans, windows, slack_s: float = 2e-4) -> dict[int, float]:
    """Index of a compute-stream span -> the idle time on the compute stream just before it that no other lane's
    span explains (none ended between the previous compute span's end and ``slack_s`` after this one's start):
    the interpreter's dispatch between two ops (issuing the next op, waiting on nothing). A wait for a load, a KV
    copy or a host lane ends with that lane's span and stays a wait (the simulator models it); the gap before a
    forward's first op is not counted (``windows``: the forwards' (start, end))."""
    ends = sorted(e for st, _, _, e, _ in spans if st != "compute")
    compute = sorted((s, e, i) for i, (st, _, s, e, _) in enumerate(spans) if st == "compute")
    starts = sorted(a for a, _ in windows)
    out, prev_end = {}, None
    for s, e, i in compute:
        w = bisect.bisect_right(starts, s) - 1
        if prev_end is not None and s > prev_end and (w < 0 or prev_end >= starts[w]):
            k = bisect.bisect_right(ends, prev_end)
            if k == len(ends) or ends[k] > s + slack_s:  # no other lane finished inside the gap
                out[i] = s - prev_end
        prev_end = e if prev_end is None else max(prev_end, e)
    return out


def op_cost(ops) -> dict | None:
    """What the compute ops among ``ops`` (:class:`klotski.schedule.Op`, one span's) cost, as the builder
    described them: kind and device of the first, FLOPs, score FLOPs, bytes read, kernel calls and tokens
    summed (JSON-ready: a span arg). None when there is no compute op."""
    ops = [op for op in ops if op.is_compute]
    if not ops:
        return None
    return {"kind": ops[0].kind, "device": ops[0].device, "flops": float(sum(op.flops for op in ops)),
            "score_flops": float(sum(op.score_flops for op in ops)), "bytes": int(sum(op.bytes for op in ops)),
            "calls": int(sum(max(1, op.calls) for op in ops)), "tokens": int(sum(op.tokens for op in ops))}


def cost_op(cost: dict, stream: str = "compute", contended: float = 0.0):
    """The :class:`klotski.schedule.Op` a span's ``cost`` arg describes (what ``op_seconds`` prices), with the
    share of its span another lane ran beside it (``contended``: :func:`contended_shares`)."""
    from klotski.schedule import Op

    return Op(0, cost["kind"], stream, cost["device"], 0, flops=cost["flops"], score_flops=cost["score_flops"],
              bytes=cost["bytes"], calls=cost["calls"], tokens=cost["tokens"], contended=contended)


def contended_shares(spans) -> dict[int, float]:
    """Index of a span -> the share of its duration during which a span of another lane ran (CPU mode: every
    lane's work, copies included, runs on the same cores). Spans of zero length are left out."""
    by_stream: dict[str, list[int]] = {}
    for i, (stream, _, s, e, _) in enumerate(spans):
        if e > s:
            by_stream.setdefault(stream, []).append(i)
    out: dict[int, float] = {}
    for stream, mine in by_stream.items():
        union: list[list[float]] = []  # the other lanes' spans, merged: disjoint [start, end], sorted
        for s, e in sorted((sp[2], sp[3]) for sp in spans if sp[0] != stream and sp[3] > sp[2]):
            if union and s <= union[-1][1]:
                union[-1][1] = max(union[-1][1], e)
            else:
                union.append([s, e])
        starts = [u[0] for u in union]
        before = [0.0]  # total length of the union's first k intervals
        for u in union:
            before.append(before[-1] + u[1] - u[0])
        for i in mine:
            s, e = spans[i][2], spans[i][3]
            lo, hi = max(bisect.bisect_right(starts, s) - 1, 0), bisect.bisect_left(starts, e)
            covered = 0.0
            if hi > lo:  # the intervals lo .. hi-1 touch [s, e]: whole, less what lies outside it
                head = min(s, union[lo][1]) - union[lo][0] if union[lo][0] < s else 0.0
                covered = before[hi] - before[lo] - head - max(0.0, union[hi - 1][1] - e)
            out[i] = min(1.0, max(0.0, covered) / (e - s))
    return out
