"""Collect expert-selection results into one targets summary: per placement, each mode at its cheapest setting
within 1 % perplexity, the top-1-union floor, and the two targets of the feature; plus the paired end-to-end
rows of ``bench_offload.py --expert-selection``.

Inputs are the JSON files ``eval_expert_selection.py`` and ``bench_offload.py`` wrote (nothing is rerun);
eval JSONs of one placement and grid over different window samples (``--window-shift``) joined by ``+`` are
pooled (perplexity from the summed log-likelihoods, the rest token-weighted) before the settings are chosen:

    python bench/quality/selection_targets.py \\
        --eval streamed=bench/results/20261202-expert-selection-e32-streamed.json \\
        --eval resident=bench/results/20261202-expert-selection-e32-resident.json \\
        --e2e bench/results/e2e-offload-<stamp>.json --tag 20261202-expert-selection-e32-targets

Targets: (1) >= 25 % fewer expert bytes per decode step than exact routing within 1 % perplexity; (2) the
offload-aware variant >= 10 % fewer bytes than plain Lynx at the same quality, judged three ways: each mode at
its cheapest setting within 1 %; at matched quality on the grid (for each offload-aware row within 1 %, plain
Lynx's cheapest row whose perplexity change is no worse, within the eval's 0.1 pp tie; the best such pair); and
offload-aware's cheapest row against plain Lynx's bytes interpolated to the same perplexity change (the grid
steps are coarse next to the 1 % budget).
Writes ``<out>/<tag>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from selection_report import compare_modes, exact_bytes, write_atomic  # noqa: E402

KEEP = ("ppl_change", "argmax_agree", "greedy_agree", "distinct", "top1_distinct", "top1_nonresident",
        "chosen_nonresident", "expert_loads_per_step", "prefetch_loads_per_step", "expert_bytes_per_step",
        "bytes_vs_exact")


def pool(evals: list[dict]) -> tuple[list[dict], float]:
    """Rows of several eval JSONs of one placement and grid (different window samples) -> (pooled rows, pooled
    top-1 floor bytes): perplexity from the summed log-likelihoods, every other figure token-weighted."""
    first = evals[0]
    for d in evals[1:]:
        if d["placement"] != first["placement"] or [r["setting"] for r in d["rows"]] != [r["setting"] for r in
                                                                                           first["rows"]]:
            raise ValueError(f"cannot pool {d['command']!r} with {first['command']!r}: placement or settings differ")
    n = [d["args"]["num_batches"] * d["args"]["batch_size"] * d["args"]["decode_steps"] for d in evals]
    total = sum(n)
    rows = []
    for group in zip(*(d["rows"] for d in evals)):
        r = dict(group[0])
        for k in KEEP + ("ppl",):
            if k == "ppl":
                r[k] = math.exp(sum(w * math.log(g[k]) for w, g in zip(n, group)) / total)
            else:
                r[k] = sum(w * g[k] for w, g in zip(n, group)) / total
        rows.append(r)
    exact, baseline = next(r for r in rows if r["setting"] == "exact"), exact_bytes(rows)
    for r in rows:
        r["ppl_change"] = r["ppl"] / exact["ppl"] - 1
        r["bytes_vs_exact"] = r["expert_bytes_per_step"] / baseline - 1
    floor = sum(w * d["top1_floor_bytes_per_step"] for w, d in zip(n, evals)) / total
    return rows, floor


def plain_bytes_at(rows: list[dict], ppl_change: float) -> float | None:
    """Plain Lynx's expert bytes per step at ``ppl_change``, linearly interpolated along its rows taken from exact
    towards aggressiveness 1, between the last row at or under that perplexity change and the next one above it
    (None when no plain row goes above it: plain never gets that bad on this grid)."""
    found = []
    for w in {r.get("prefetch_width") for r in rows}:  # one curve per prefetch width: the cheapest one counts
        curve = sorted((r for r in rows if r["mode"] in ("exact", "lynx") and r.get("prefetch_width") == w),
                       key=lambda r: r["aggressiveness"])
        for a, b in zip(curve, curve[1:]):
            if a["ppl_change"] <= ppl_change < b["ppl_change"]:
                t = (ppl_change - a["ppl_change"]) / (b["ppl_change"] - a["ppl_change"])
                found.append(a["expert_bytes_per_step"] + t * (b["expert_bytes_per_step"] - a["expert_bytes_per_step"]))
                break
    return min(found, default=None)


def placement_summary(name: str, paths: list[str]) -> dict:
    """One placement's summary from one eval JSON, or several of different window samples pooled."""
    evals = [json.loads(open(path).read()) for path in paths]
    for path, d in zip(paths, evals):
        if not any(r["setting"] == "exact" for r in d.get("rows", [])):
            raise ValueError(f"{path}: no 'exact' row (is this an eval_expert_selection.py JSON?)")
    if len(evals) == 1:
        rows, floor = evals[0]["rows"], evals[0]["top1_floor_bytes_per_step"]
    else:
        rows, floor = pool(evals)
    # the baseline: exact routing at its cheapest prefetch width (the plan's, when only that one ran)
    exact = min((r for r in rows if r["mode"] == "exact"), key=lambda r: r["expert_bytes_per_step"])
    cheapest, _, best = compare_modes(rows)
    chosen = {"exact": exact, **cheapest}
    out = {"name": name, "commands": [d["command"] for d in evals], "json": [os.path.relpath(p) for p in paths],
           "placement": evals[0]["placement"], "resident_loads_counted": sum(d["resident_loads_counted"] for d in evals),
           "run_noise": [d.get("run_noise") for d in evals], "top1_floor_bytes_per_step": floor,
           "top1_floor_vs_exact": floor / exact["expert_bytes_per_step"] - 1,
           "rows": {("exact" if key == "exact" else r["setting"]): {**{k: r[k] for k in KEEP},
                                                                  "prefetch_width": r.get("prefetch_width")}
                    for key, r in chosen.items()},
           "target_25pct": {m: r["bytes_vs_exact"] <= -0.25 for m, r in cheapest.items()},
           "offload_vs_plain_matched": best}
    if len(cheapest) == 2:
        out["offload_vs_plain_cheapest"] = (cheapest["lynx-offload"]["expert_bytes_per_step"]
                                            / cheapest["lynx"]["expert_bytes_per_step"] - 1)
    full = min((r for r in rows if r["mode"] == "lynx-offload" and r["aggressiveness"] == 1.0),
               key=lambda r: r["expert_bytes_per_step"], default=None)
    if full is not None and "lynx" in cheapest:  # every droppable expert that costs a load dropped
        out["offload_floor"] = {k: full[k] for k in KEEP}
        out["offload_floor_vs_plain_cheapest"] = (full["expert_bytes_per_step"]
                                                  / cheapest["lynx"]["expert_bytes_per_step"] - 1)
    if "lynx-offload" in cheapest:
        aware = cheapest["lynx-offload"]
        plain = plain_bytes_at(rows, aware["ppl_change"])
        out["offload_vs_plain_interpolated"] = (None if plain is None else
                                                {"offload": aware["setting"], "ppl_change": aware["ppl_change"],
                                                 "plain_bytes_per_step": plain,
                                                 "offload_vs_plain": aware["expert_bytes_per_step"] / plain - 1})
    return out


def e2e_rows(path: str) -> list[dict]:
    d = json.loads(open(path).read())
    rows = [r for r in d["rows"] if r.get("expert_selection_setting")]
    if not rows:
        raise ValueError(f"{path}: no expert-selection rows (run bench_offload.py with --expert-selection)")
    off = next((r for r in rows if r["expert_selection_setting"] == "off"), None)
    a = d["args"]
    return [{"json": os.path.relpath(path), "gpu_memory": a["gpu_memory"], "setting": r["expert_selection_setting"],
             "placement": r["placement"], "tokens_per_s": r["tokens_per_s"],
             "expert_bytes_per_decode_step": r["expert_bytes_per_decode_step"],
             "vs_exact": (r["expert_bytes_per_decode_step"] / off["expert_bytes_per_decode_step"] - 1
                          if off and off["expert_bytes_per_decode_step"] else None)} for r in rows]


def markdown(places: list[dict], e2e: list[dict]) -> str:
    md = ["| placement | setting | ppl change | argmax / greedy agree | distinct / layer / step | expert loads / step "
          "(prefetched) | expert KiB / step | vs exact |", "|---|---|---|---|---|---|---|---|"]
    for p in places:
        for s, r in p["rows"].items():
            label = s if s != "exact" or r.get("prefetch_width") is None else f"exact (width {r['prefetch_width']})"
            md.append(f"| {p['name']} | {label} | {100 * r['ppl_change']:+.2f} % | {r['argmax_agree']:.3f} / "
                      f"{r['greedy_agree']:.3f} | {r['distinct']:.2f} | {r['expert_loads_per_step']:.1f} "
                      f"({r['prefetch_loads_per_step']:.1f}) | {r['expert_bytes_per_step'] / 1024:.0f} | "
                      + ("" if s == "exact" else f"{100 * r['bytes_vs_exact']:+.1f} %") + " |")
    md += ["", "| placement | distinct (router) | distinct top-1 (non-resident) | top-1 floor KiB / step | floor vs exact |"
           " resident loads counted |", "|---|---|---|---|---|---|"]
    for p in places:
        e = p["rows"]["exact"]
        md.append(f"| {p['name']} | {e['distinct']:.2f} | {e['top1_distinct']:.2f} ({e['top1_nonresident']:.2f}) | "
                  f"{p['top1_floor_bytes_per_step'] / 1024:.0f} | {100 * p['top1_floor_vs_exact']:+.1f} % | "
                  f"{p['resident_loads_counted']} |")
    md += [""]
    for p in places:
        met = ", ".join(f"{m} {'met' if ok else 'not met'}" for m, ok in p["target_25pct"].items())
        md.append(f"- {p['name']}: >= 25 % fewer bytes than exact within 1 % ppl: {met or 'no row within 1 %'}")
        if "offload_vs_plain_cheapest" in p:
            c = p["offload_vs_plain_cheapest"]
            md.append(f"- {p['name']}: offload-aware vs plain, each at its cheapest within 1 %: {100 * c:+.1f} % bytes "
                      f"(target -10 %: {'met' if c <= -0.10 else 'not met'})")
        m = p["offload_vs_plain_matched"]
        if m:
            md.append(f"- {p['name']}: offload-aware vs plain at matched quality: {m['offload']} "
                      f"({100 * m['offload_ppl']:+.2f} % ppl) vs {m['plain']} ({100 * m['plain_ppl']:+.2f} % ppl): "
                      f"{100 * m['offload_vs_plain']:+.1f} % bytes (target -10 %: "
                      f"{'met' if m['offload_vs_plain'] <= -0.10 else 'not met'})")
        if "offload_floor" in p:
            f = p["offload_floor"]
            md.append(f"- {p['name']}: room: lynx-offload:1.0 (every expert that costs a load and is no token's top-1 "
                      f"dropped; the rest are top-1 or prefetched before the gate) loads {f['expert_loads_per_step']:.1f}"
                      f" / step, {f['expert_bytes_per_step'] / 1024:.0f} KiB ({100 * f['ppl_change']:+.2f} % ppl): "
                      f"{100 * p['offload_floor_vs_plain_cheapest']:+.1f} % against plain Lynx's cheapest within 1 %")
        i = p.get("offload_vs_plain_interpolated")
        if i:
            md.append(f"- {p['name']}: offload-aware's cheapest within 1 % ({i['offload']}, {100 * i['ppl_change']:+.2f} % "
                      f"ppl) vs plain Lynx interpolated to that perplexity ({i['plain_bytes_per_step'] / 1024:.0f} KiB): "
                      f"{100 * i['offload_vs_plain']:+.1f} % bytes (target -10 %: "
                      f"{'met' if i['offload_vs_plain'] <= -0.10 else 'not met'})")
        for n in filter(None, p["run_noise"]):
            md.append(f"- {p['name']}: run-to-run noise of exact routing: ppl {100 * n['ppl_change']:+.5f} %, argmax "
                      f"agree {n['argmax_agree']:.3f}, greedy agree {n['greedy_agree']:.3f}")
    if e2e:
        md += ["", "| e2e json | gpu | setting | tok/s | expert MiB / decode step | vs exact |", "|---|---|---|---|---|---|"]
        for r in e2e:
            vs = "" if r["vs_exact"] is None or r["setting"] == "off" else f"{100 * r['vs_exact']:+.1f} %"
            md.append(f"| {os.path.basename(r['json'])} | {r['gpu_memory']} | {r['setting']} | {r['tokens_per_s']:.1f} | "
                      f"{r['expert_bytes_per_decode_step'] / 2**20:.2f} | {vs} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", action="append", default=[], metavar="NAME=JSON[+JSON...]", required=True,
                   help="an eval_expert_selection.py JSON and the placement name it stands for; several joined "
                        "by '+' (same placement and grid, other window samples) are pooled")
    p.add_argument("--e2e", action="append", default=[], metavar="JSON", help="a bench_offload.py JSON")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    p.add_argument("--tag", required=True)
    args = p.parse_args(argv)
    places = []
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--eval wants NAME=JSON, got {item!r}")
        places.append(placement_summary(name, path.split("+")))
    e2e = [r for path in args.e2e for r in e2e_rows(path)]
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    md = markdown(places, e2e)
    print(md)
    base = os.path.join(args.out, args.tag)
    write_atomic(base + ".md", f"# Expert selection targets\n\n`{cmd}`\n\nCommands of the inputs:\n\n"
                 + "".join(f"- {p['name']} ({p['placement']}): " + "; ".join(f"`{c}`" for c in p["commands"]) + "\n"
                           for p in places) + "\n" + md)
    write_atomic(base + ".json", json.dumps({"command": cmd, "eval": {p["name"]: p for p in places}, "e2e": e2e},
                                            indent=1) + "\n")
    print(f"wrote {os.path.normpath(base)}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
