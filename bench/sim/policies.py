"""Predicted tokens/s and compute bubble per policy, model and hardware preset (cost model + simulator).

    python bench/sim/policies.py [--models ...] [--hardware ...] [--prompt-len 512 --gen-len 32]

Prints a markdown table (paste into bench/sim/README.md) and writes JSON to bench/results/sim_policies.json.
Paper numbers (Klotski, ASPLOS'25: Mixtral bf16, input 512, output 32) are shown beside the
matching rows.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from klotski.costs import ModelCosts, weight_dtype_of
from klotski.hardware import PRESETS, preset
from klotski.planner import Planner
from klotski.presets import MODEL_CONFIGS, model_config

# (model, hardware preset) -> paper throughput (tokens/s): simple pipeline, + multi-batch, Klotski
PAPER = {
    ("mixtral-8x7b", "rtx3090-pcie4"): {"layerwise": 5.72, "flexgen": 18.24, "klotski": 22.41},
    ("mixtral-8x22b", "rtx3090-pcie4"): {"layerwise": 0.01, "flexgen": 0.97, "klotski": 1.33},
    ("mixtral-8x22b", "h800-pcie5"): {"layerwise": 1.15, "flexgen": 34.07, "klotski": 52.85},
}
POLICIES = ("layerwise", "flexgen", "klotski", "resident")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODEL_CONFIGS))
    ap.add_argument("--hardware", nargs="*", default=list(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--cpu-memory", default=None)
    ap.add_argument("--out", default="bench/results/sim_policies.json")
    args = ap.parse_args()
    rows, results = [], []
    print("| model | hardware | policy | batch x n | predicted tok/s | bubble | paper tok/s | plan s |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        cfg = model_config(model)
        costs = ModelCosts.from_config(cfg, name=model, weight_dtype=weight_dtype_of(cfg))
        for hw_name in args.hardware:
            hw = preset(hw_name).with_memory(args.gpu_memory, args.cpu_memory)
            t0 = time.perf_counter()
            plans = Planner(costs, hw, args.prompt_len, args.gen_len).compare(POLICIES)
            dt = time.perf_counter() - t0
            paper = PAPER.get((model, hw.name), {})
            for policy, plan in plans.items():
                ref = paper.get(policy)
                ref_s = "" if ref is None else f"{ref:g}"
                if plan is None:
                    print(f"| {model} | {hw.name} | {policy} | - | does not fit | - | {ref_s} | {dt:.1f} |")
                    results.append({"model": model, "hardware": hw.name, "policy": policy, "fits": False})
                    continue
                order = " (flexgen order)" if policy == "klotski" and plan.num_hot is None else ""
                print(f"| {model} | {hw.name} | {policy}{order} | {plan.batch_size} x {plan.n} | "
                      f"{plan.tokens_per_s:.2f} | {plan.bubble_fraction:.1%} | {ref_s} | {dt:.1f} |")
                results.append({"model": model, "hardware": hw.name, "policy": policy, "fits": True,
                                "batch_size": plan.batch_size, "n": plan.n, "tokens_per_s": plan.tokens_per_s,
                                "bubble_fraction": plan.bubble_fraction, "paper_tokens_per_s": ref,
                                "num_hot": plan.num_hot, "placement": plan.placement.describe(costs.spec.num_experts)})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"prompt_len": args.prompt_len, "gen_len": args.gen_len, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
