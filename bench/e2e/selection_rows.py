"""bench_offload.py's expert-selection rows: routed-expert bytes loaded per decode step, the paired table and
the targets (klotski.model.expert_selection).

:func:`count_decode_loads` wraps ``OffloadedExecutor.forward`` in this process (bench instrumentation, the
package is not changed): each forward appends ``(decode, expert bytes loaded)`` to ``executor.bench_forwards``,
the bytes summed over the routed-expert load spans the forward traced (``L<layer> e<expert>``), so rebuilt
executors (a re-plan) are counted too.
"""
from __future__ import annotations

import re

EXPERT_LOAD = re.compile(r"^L\d+ e\d+$")


def count_decode_loads() -> None:
    from klotski.model.expert_selection import is_decode_step
    from klotski.runtime.executor import OffloadedExecutor

    if getattr(OffloadedExecutor.forward, "counts_loads", False):
        return
    inner = OffloadedExecutor.forward

    def forward(self, input_ids, cache, all_logits=False):
        decode = is_decode_step(input_ids.shape[1], cache.length)
        n0 = len(self.tracer.spans)
        out = inner(self, input_ids, cache, all_logits)
        moved = sum(a.get("bytes", 0) for _, name, _, _, a in self.tracer.spans[n0:] if EXPERT_LOAD.match(name))
        self.__dict__.setdefault("bench_forwards", []).append((decode, moved))
        return out

    forward.counts_loads = True
    OffloadedExecutor.forward = forward


def decode_fields(ex, since: int = 0) -> dict:
    """Expert bytes per decode step over ``ex.bench_forwards[since:]``."""
    steps = [b for d, b in ex.__dict__.get("bench_forwards", [])[since:] if d]
    return {"decode_steps": len(steps), "expert_bytes_per_decode_step": sum(steps) / len(steps) if steps else 0.0}


def distinct(row: dict, key: str = "selection_distinct_per_layer") -> float:
    d = row.get(key) or {}
    return sum(d.values()) / len(d) if d else float("nan")


def print_selection(rows: list[dict], format_bytes) -> None:
    print(f"{'policy':<10} {'selection':<18} {'tok/s':>8} {'expert bytes/decode step':>25} {'vs exact':>9} "
          f"{'distinct/layer':>14} {'router distinct':>15} {'remapped':>9}")
    for r in rows:
        if "expert_selection_setting" not in r:
            continue
        base = next((b for b in rows if b["policy"] == r["policy"] and b.get("expert_selection_setting") == "off"),
                    None)
        vs = (r["expert_bytes_per_decode_step"] / base["expert_bytes_per_decode_step"] - 1
              if base and base["expert_bytes_per_decode_step"] else float("nan"))
        print(f"{r['policy']:<10} {r['expert_selection_setting']:<18} {r['tokens_per_s']:>8.2f} "
              f"{format_bytes(r['expert_bytes_per_decode_step']):>25} {vs:>+9.1%} {distinct(r):>14.2f} "
              f"{distinct(r, 'selection_distinct_exact_per_layer'):>15.2f} "
              f"{r.get('selection_remapped_fraction', 0.0):>9.1%}")


def selection_targets(rows: list[dict]) -> dict:
    """>= 25% fewer expert bytes per decode step than exact (each selection row of a policy), and the
    offload-aware row >= 10% fewer than the plain one (the first of each mode)."""
    out = {}
    for r in rows:
        s = r.get("expert_selection_setting")
        if not s or s == "off":
            continue
        base = next((b for b in rows if b["policy"] == r["policy"] and b.get("expert_selection_setting") == "off"),
                    None)
        if base and base["expert_bytes_per_decode_step"]:
            cut = 1 - r["expert_bytes_per_decode_step"] / base["expert_bytes_per_decode_step"]
            out[f"{r['policy']} {s} expert bytes/decode step cut vs exact"] = {"value": cut, "want": ">= 0.25",
                                                                            "met": cut >= 0.25}
    for policy in {r["policy"] for r in rows}:
        mine = [r for r in rows if r["policy"] == policy and r.get("expert_selection_setting")]
        plain = next((r for r in mine if r["expert_selection_setting"].startswith("lynx:")), None)
        aware = next((r for r in mine if r["expert_selection_setting"].startswith("lynx-offload:")), None)
        if plain and aware and plain["expert_bytes_per_decode_step"]:
            cut = 1 - aware["expert_bytes_per_decode_step"] / plain["expert_bytes_per_decode_step"]
            out[f"{policy} offload-aware cut vs plain lynx"] = {"value": cut, "want": ">= 0.10", "met": cut >= 0.10}
    return out
