"""Predicted routed-expert phase of one MoE layer on G devices: FSE-DP vs expert parallelism vs replicated
offloading, over models, hardware presets and tokens per device (cost model, not a measurement).

    python bench/distributed/predict_fsedp.py [--devices 2] [--models mixtral-8x7b,qwen3-30b-a3b]
        [--hardware h100,rtx3090] [--tokens 1,4,16,64,256,1024,4096] [--seeds 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from results import command_line, write_json
from klotski.costs import ModelCosts
from klotski.distributed.predict import STRATEGIES, LayerShape, predict_layer, sample_counts, zipf_popularity
from klotski.hardware import preset
from klotski.presets import model_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--hardware", default="h100,a100,rtx3090")
    ap.add_argument("--tokens", default="1,4,16,64,256,1024,4096", help="tokens per device")
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4, help="routing samples averaged per row")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                    time.strftime("%Y%m%d") + "-fsedp-predict.json"))
    args = ap.parse_args()
    rows = []
    head = (f"{'model':<15} {'hardware':<14} {'tok/dev':>7} " + " ".join(f"{s + ' ms':>17}" for s in STRATEGIES)
            + f" {'fse/ep':>7} {'host fse/repl':>13}")
    print(head)
    print("-" * len(head))
    for model in args.models.split(","):
        costs = ModelCosts.from_config(model_config(model), name=model)
        shape = LayerShape.from_costs(costs)
        spec = costs.spec
        for hw_name in args.hardware.split(","):
            hw = preset(hw_name)
            for tokens in (int(t) for t in args.tokens.split(",")):
                preds = [predict_layer(sample_counts(zipf_popularity(spec.num_experts, args.zipf), args.devices,
                                                     tokens, spec.top_k, seed), shape, hw, args.slices, args.slots)
                         for seed in range(args.seeds)]
                ms = {s: float(np.mean([p[s].step_s for p in preds])) * 1e3 for s in STRATEGIES}
                host = {s: float(np.mean([p[s].host_bytes for p in preds])) for s in STRATEGIES}
                row = dict(model=model, hardware=hw.name, devices=args.devices, tokens_per_device=tokens,
                           step_ms=ms, host_bytes=host, fse_over_ep=ms["fse-dp"] / ms["expert-parallel"],
                           host_fse_over_replicated=host["fse-dp"] / host["replicated"])
                rows.append(row)
                print(f"{model:<15} {hw.name:<14} {tokens:>7} " + " ".join(f"{ms[s]:>17.2f}" for s in STRATEGIES)
                      + f" {row['fse_over_ep']:>7.3f} {row['host_fse_over_replicated']:>13.3f}")
    out = dict(command=command_line("predict_fsedp.py", args), zipf=args.zipf,
        note="cost-model predictions (klotski.distributed.predict), not measurements", rows=rows)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
