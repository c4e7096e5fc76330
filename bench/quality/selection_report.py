"""Tables and judgements of ``eval_expert_selection.py``'s rows, shared with ``selection_targets.py``: each mode's
cheapest row within 1 % perplexity, offload-aware against plain Lynx at matched quality, the top-1 floor, the
plot, atomic writes.

A row is one (selection setting, prefetch width) run: ``setting`` (its label), ``mode`` ("exact", "lynx",
"lynx-offload"), ``aggressiveness``, ``prefetch_width`` (hot experts prefetched per MoE layer; absent in JSONs
written before widths were swept), ``ppl_change`` and ``expert_bytes_per_step`` among others. Rows of every
width compete: a mode's cheapest row is its cheapest over settings and widths.
"""
from __future__ import annotations

import os

PPL_TIE = 0.001  # perplexity changes within 0.1 percentage point count as the same quality


def exact_bytes(rows: list[dict]) -> float:
    """The baseline of every "vs exact": exact routing's expert bytes per decode step at its cheapest prefetch
    width among the rows (the plan's width when only that one ran)."""
    return min(r["expert_bytes_per_step"] for r in rows if r["mode"] == "exact")


def compare_modes(rows: list[dict]) -> tuple[dict, list[dict], dict | None]:
    """Rows with ``mode``, ``setting``, ``ppl_change``, ``expert_bytes_per_step`` -> (each mode's cheapest row
    within 1 % perplexity, the matched pairs: for each offload-aware row within 1 %, plain Lynx's cheapest row
    whose perplexity change is <= the offload-aware row's + ``PPL_TIE``, and the pair with the largest cut)."""
    ok = {m: [r for r in rows if r["mode"] == m and r["ppl_change"] <= 0.01] for m in ("lynx", "lynx-offload")}
    cheapest = {m: min(rs, key=lambda r: r["expert_bytes_per_step"]) for m, rs in ok.items() if rs}
    matched = []
    for o in ok.get("lynx-offload", []):
        plain = [r for r in rows if r["mode"] == "lynx" and r["ppl_change"] <= o["ppl_change"] + PPL_TIE]
        if plain:
            p = min(plain, key=lambda r: r["expert_bytes_per_step"])
            matched.append({"offload": o["setting"], "plain": p["setting"], "offload_ppl": o["ppl_change"],
                            "plain_ppl": p["ppl_change"],
                            "offload_vs_plain": o["expert_bytes_per_step"] / p["expert_bytes_per_step"] - 1})
    return cheapest, matched, (min(matched, key=lambda m: m["offload_vs_plain"]) if matched else None)


def floor_and_targets(rows: list[dict], ref: dict, spec, baseline: float) -> dict:
    """The top-1 floor (the fewest expert bytes per decode step any rule that keeps every token's top-1 can
    load: the non-resident experts among the step's top-1 union, from the exact row's routing) and the two
    targets: >= 25% fewer expert bytes than exact within 1% perplexity; the offload-aware variant >= 10% fewer
    bytes than plain Lynx at no worse perplexity (plain's cheapest row whose perplexity change is <= the
    offload-aware row's + ``PPL_TIE``: perplexity changes that close are one quality level on this many tokens)
    -> dict with a ``markdown`` paragraph."""
    exact = next(r for r in rows if r["setting"] == "exact")
    layers = len(ref["distinct_per_layer"]) or 1
    per_load = ref["bytes_per_load"]
    floor_bytes = exact["top1_nonresident"] * layers * per_load
    floor_cut = floor_bytes / baseline - 1 if baseline else float("nan")
    cheapest, matched, best_match = compare_modes(rows)
    resident = sum(r["resident_loads"] for r in rows)
    md = [f"Byte accounting: {resident} loads of GPU-resident experts counted over all rows (resident experts are "
          f"served from their permanent slots; the loads counted are those of `L<layer> e<expert>` spans, "
          f"{per_load / 1024:.0f} KiB each).",
          "",
          f"Top-1 floor (exact routing, {layers} MoE layers): distinct top-1 experts per layer per decode step "
          f"{exact['top1_distinct']:.2f} of {spec.num_experts} (router's distinct {exact['distinct_router']:.2f}), "
          f"of them not GPU-resident {exact['top1_nonresident']:.2f}; every token keeps its top-1, so no rule can "
          f"load fewer than {floor_bytes / 1024:.0f} KiB per decode step: at best {100 * floor_cut:+.1f}% against "
          f"exact's {baseline / 1024:.0f} KiB."]
    md.append("")
    md.append("Loads per decode step against what the step's routing needs (its chosen non-resident experts, summed "
              "over layers); the rest are prefetched hot experts the gate did not choose (issued before the gate, "
              "so selection cannot avoid them) net of expert-slot hits:")
    for r in [exact, *cheapest.values()]:
        md.append(f"- {r['setting']}: needed {r['chosen_nonresident'] * layers:.1f}, loaded "
                  f"{r['expert_loads_per_step']:.1f} ({r['prefetch_loads_per_step']:.1f} prefetched)")
    md.append("")
    for m, r in cheapest.items():
        md.append(f"- {m}: cheapest within 1% perplexity {r['setting']}: {100 * r['bytes_vs_exact']:+.1f}% bytes "
                  f"(ppl {100 * r['ppl_change']:+.2f}%, top-1 non-resident {r['top1_nonresident']:.2f}); target "
                  f"-25%: {'met' if r['bytes_vs_exact'] <= -0.25 else 'not met'}")
    if "lynx" in cheapest and "lynx-offload" in cheapest:
        a, b = cheapest["lynx-offload"], cheapest["lynx"]
        cut = a["expert_bytes_per_step"] / b["expert_bytes_per_step"] - 1
        md.append(f"- offload-aware vs plain, each at its cheapest within 1% perplexity: {a['setting']} vs "
                  f"{b['setting']}: {100 * cut:+.1f}% bytes; target -10%: {'met' if cut <= -0.10 else 'not met'}")
    if best_match:
        md.append(f"- offload-aware vs plain at no worse perplexity (+{100 * PPL_TIE:.1f} pp tie): {best_match['offload']} "
                  f"({100 * best_match['offload_ppl']:+.2f}% ppl) vs {best_match['plain']} "
                  f"({100 * best_match['plain_ppl']:+.2f}% ppl): {100 * best_match['offload_vs_plain']:+.1f}% bytes; "
                  f"target -10%: {'met' if best_match['offload_vs_plain'] <= -0.10 else 'not met'}")
    return {"resident_loads_counted": resident, "top1_floor_bytes_per_step": floor_bytes,
            "top1_floor_vs_exact": floor_cut, "cheapest_within_1pct": {m: r["setting"] for m, r in cheapest.items()},
            "offload_vs_plain_matched": matched, "markdown": "\n".join(md) + "\n"}


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(rows: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    widths = sorted({r.get("prefetch_width") for r in rows}, key=lambda w: -1 if w is None else w)
    curves = [(m, w) for m in sorted({r["mode"] for r in rows if r["mode"] != "exact"}) for w in widths]
    for mode, w in curves:
        pts = [r for r in rows if r["mode"] in (mode, "exact") and r.get("prefetch_width") == w]
        label = mode if len(widths) == 1 else f"{mode} w{w}"
        a = [r["aggressiveness"] for r in pts]
        axes[0].plot(a, [100 * r["ppl_change"] for r in pts], "o-", label=label)
        axes[1].plot(a, [r["distinct"] for r in pts], "o-", label=label)
        axes[2].plot([r["expert_bytes_per_step"] / 2**20 for r in pts], [100 * r["ppl_change"] for r in pts], "o-",
                     label=label)
    axes[0].set(xlabel="aggressiveness", ylabel="perplexity change (%)")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set(xlabel="aggressiveness", ylabel="distinct experts / layer / decode step")
    axes[2].set(xlabel="expert MiB loaded / decode step", ylabel="perplexity change (%)")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {os.path.normpath(path)}"


