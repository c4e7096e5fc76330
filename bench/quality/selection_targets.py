"""Collect expert-selection results into one targets summary: per placement, each mode at its cheapest setting
within 1 % perplexity, the top-1-union floor, and the two targets of the feature; plus the paired end-to-end
rows of ``bench_offload.py --expert-selection``.

Inputs are the JSON files ``eval_expert_selection.py`` and ``bench_offload.py`` wrote (nothing is rerun):

    python bench/quality/selection_targets.py \\
        --eval streamed=bench/results/20261202-expert-selection-e32-streamed.json \\
        --eval resident=bench/results/20261202-expert-selection-e32-resident.json \\
        --e2e bench/results/e2e-offload-<stamp>.json --tag 20261202-expert-selection-e32-targets

Targets: (1) >= 25 % fewer expert bytes per decode step than exact routing within 1 % perplexity; (2) the
offload-aware variant >= 10 % fewer bytes than plain Lynx at the same quality, judged two ways: each mode at its
cheapest setting within 1 %, and at matched quality (for each offload-aware row within 1 %, plain Lynx's
cheapest row whose perplexity change is no worse, within the eval's 0.1 pp tie; the best such pair).
Writes ``<out>/<tag>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_expert_selection import write_atomic  # noqa: E402

KEEP = ("ppl_change", "argmax_agree", "greedy_agree", "distinct", "top1_distinct", "top1_nonresident",
        "chosen_nonresident", "expert_loads_per_step", "prefetch_loads_per_step", "expert_bytes_per_step",
        "bytes_vs_exact")


def placement_summary(name: str, path: str) -> dict:
    d = json.loads(open(path).read())
    rows = {r["setting"]: r for r in d["rows"]}
    if "exact" not in rows:
        raise ValueError(f"{path}: no 'exact' row (is this an eval_expert_selection.py JSON?)")
    chosen = {"exact": rows["exact"], **{m: rows[s] for m, s in d["cheapest_within_1pct"].items()}}
    out = {"command": d["command"], "json": os.path.relpath(path), "placement": d["placement"],
           "resident_loads_counted": d["resident_loads_counted"], "run_noise": d.get("run_noise"),
           "top1_floor_bytes_per_step": d["top1_floor_bytes_per_step"], "top1_floor_vs_exact": d["top1_floor_vs_exact"],
           "rows": {r["setting"]: {k: r[k] for k in KEEP} for r in chosen.values()}}
    plain, aware = chosen.get("lynx"), chosen.get("lynx-offload")
    out["target_25pct"] = {m: chosen[m]["bytes_vs_exact"] <= -0.25 for m in ("lynx", "lynx-offload") if m in chosen}
    if plain and aware:
        out["offload_vs_plain_cheapest"] = aware["expert_bytes_per_step"] / plain["expert_bytes_per_step"] - 1
    matched = d.get("offload_vs_plain_matched") or []
    out["offload_vs_plain_matched"] = min(matched, key=lambda m: m["offload_vs_plain"]) if matched else None
    out["name"] = name
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
            md.append(f"| {p['name']} | {s} | {100 * r['ppl_change']:+.2f} % | {r['argmax_agree']:.3f} / "
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
        if p.get("run_noise"):
            n = p["run_noise"]
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
    p.add_argument("--eval", action="append", default=[], metavar="NAME=JSON", required=True,
                   help="an eval_expert_selection.py JSON and the placement name it stands for")
    p.add_argument("--e2e", action="append", default=[], metavar="JSON", help="a bench_offload.py JSON")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    p.add_argument("--tag", required=True)
    args = p.parse_args(argv)
    places = []
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--eval wants NAME=JSON, got {item!r}")
        places.append(placement_summary(name, path))
    e2e = [r for path in args.e2e for r in e2e_rows(path)]
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    md = markdown(places, e2e)
    print(md)
    base = os.path.join(args.out, args.tag)
    write_atomic(base + ".md", f"# Expert selection targets\n\n`{cmd}`\n\nCommands of the inputs:\n\n"
                 + "".join(f"- {p['name']} ({p['placement']}): `{p['command']}`\n" for p in places) + "\n" + md)
    write_atomic(base + ".json", json.dumps({"command": cmd, "eval": {p["name"]: p for p in places}, "e2e": e2e},
                                            indent=1) + "\n")
    print(f"wrote {os.path.normpath(base)}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
