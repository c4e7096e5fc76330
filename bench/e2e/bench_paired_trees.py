"""Two source trees (e.g. two commits' worktrees) run the same bench_offload command alternately, paired.

    git worktree add /tmp/before <commit>      # its klotski/_C*.so built or copied in
    python bench/e2e/bench_paired_trees.py --before /tmp/before --after . --rounds 2 -- \\
        --layers 8 --gpu-memory 64MiB --cpu-memory 24MiB

Each round runs ``bench/e2e/bench_offload.py ARGS`` of the "before" tree then of the "after" tree (each with
its own package on PYTHONPATH), so machine noise hits both alike; prints tokens/s per policy and round and the
after/before ratio of the medians, and writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run(tree: str, bench_args: list[str]) -> dict[str, float]:
    out = tempfile.mkdtemp(prefix="klotski-paired-")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    env.pop("TRITON_INTERPRET", None)  # never time the interpreter
    subprocess.run([sys.executable, os.path.join(tree, "bench", "e2e", "bench_offload.py"), *bench_args,
                    "--out", out], env=env, check=True, stdout=subprocess.DEVNULL)
    (path,) = glob.glob(os.path.join(out, "e2e-offload-*.json"))
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {r["policy"]: r["tokens_per_s"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench_offload.py's arguments")
    args = ap.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    results = {"before": [], "after": []}
    for i in range(args.rounds):
        for side in ("before", "after"):
            rates = run(getattr(args, side), bench_args)
            results[side].append(rates)
            print(f"round {i + 1} {side:<6} " + "  ".join(f"{p} {r:.2f}" for p, r in rates.items()), flush=True)
    print(f"{'policy':<10} {'before':>8} {'after':>8} {'after/before':>12}   (medians, tokens/s)")
    summary = {}
    for policy in results["before"][0]:
        b = statistics.median(r[policy] for r in results["before"])
        a = statistics.median(r[policy] for r in results["after"])
        summary[policy] = {"before": b, "after": a, "ratio": a / b}
        print(f"{policy:<10} {b:>8.2f} {a:>8.2f} {a / b:>12.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e-paired-trees-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"before": os.path.abspath(args.before), "after": os.path.abspath(args.after),
                   "bench_args": bench_args, "rounds": results, "summary": summary}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
