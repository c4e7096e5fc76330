"""Timelines of a simulated (or measured) schedule: Chrome/Perfetto trace JSON and a PNG, one row per stream.

``write_chrome_trace(schedule, result, path)`` writes the Trace Event Format (``"X"`` complete events, times
in microseconds; open in ui.perfetto.dev or chrome://tracing). ``write_timeline_png`` draws compute vs I/O per
stream with matplotlib (optional extra: ``pip install klotski[plot]``).
"""
from __future__ import annotations

import json
import os

STREAM_ORDER = ("compute", "prefetch", "expert_io", "kv_load", "kv_store", "disk")
COLORS = {"attn": "#4C72B0", "gate": "#8172B2", "expert": "#55A868", "experts": "#55A868", "shared": "#64B5CD",
          "lm_head": "#937860", "h2d": "#DD8452", "read": "#C44E52", "kv_load": "#DA8BC3", "kv_store": "#8C8C8C"}


def _streams(schedule) -> list[str]:
    present = {op.stream for op in schedule.ops}
    return [s for s in STREAM_ORDER if s in present] + sorted(present - set(STREAM_ORDER))


def _label(op) -> str:
    parts = [op.kind, f"L{op.layer}"]
    if op.batch is not None:
        parts.append(f"b{op.batch}")
    if op.expert is not None:
        parts.append(f"e{op.expert}")
    return " ".join(parts)


def chrome_trace(schedule, result) -> dict:
    """The trace as a dict: one thread (row) per stream, one complete event per op (releases omitted)."""
    streams = _streams(schedule)
    tid = {s: i for i, s in enumerate(streams)}
    events = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": tid[s], "args": {"name": s}} for s in streams]
    events.append({"ph": "M", "name": "process_name", "pid": 0, "args": {"name": f"klotski {schedule.policy}"}})
    for op in schedule.ops:
        if op.kind == "release":
            continue
        events.append({
            "ph": "X", "name": _label(op), "cat": op.kind, "pid": 0, "tid": tid[op.stream],
            "ts": result.start[op.id] * 1e6, "dur": (result.finish[op.id] - result.start[op.id]) * 1e6,
            "args": {"id": op.id, "device": op.device, "bytes": op.bytes, "flops": op.flops + op.score_flops,
                     "tokens": op.tokens, "deps": list(op.deps)},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"policy": schedule.policy, "makespan_s": result.makespan,
                          "bubble_fraction": result.bubble_fraction}}


def write_chrome_trace(schedule, result, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(schedule, result), f)


def write_timeline_png(schedule, result, path: str | os.PathLike, title: str | None = None) -> None:
    """A PNG with one row per stream; bars coloured by op kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError("the PNG timeline needs matplotlib: pip install 'klotski[plot]'") from e
    streams = _streams(schedule)
    fig, ax = plt.subplots(figsize=(14, 0.6 * len(streams) + 1.5))
    scale, unit = (1e3, "ms") if result.makespan < 10 else (1.0, "s")
    for row, stream in enumerate(streams):
        bars, colors = [], []
        for op in schedule.ops:
            if op.stream == stream and op.kind != "release" and result.finish[op.id] > result.start[op.id]:
                bars.append((result.start[op.id] * scale, (result.finish[op.id] - result.start[op.id]) * scale))
                colors.append(COLORS.get(op.kind, "#999999"))
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colors, edgecolor="none")
    ax.set_yticks(range(len(streams)), streams)
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title or f"{schedule.policy} {schedule.shape.phase}: makespan {result.makespan * scale:.2f} {unit}, "
                 f"compute bubble {result.bubble_fraction:.1%}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncol=len(COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.25),
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
