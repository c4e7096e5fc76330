"""Predicted tokens/s with and without host compute (CPU attention over a host KV cache, cold experts on the CPU)
for Mixtral-8x7B on the A5000, L4 and T4 presets, beside MoE-Gen's and MoE-Lightning's published figures.

    python bench/sim/host_compute.py [--prompt-len 512 --gen-len 256 --hardware a5000 l4 t4]

PREDICTIONS of the cost model + simulator on preset hardware (klotski/hardware.py: estimates, not measurements),
not runs. Each row is the planner's best plan for the policy with ``host="off"`` (everything on the device) and
``host="search"`` (attention per phase and cold experts may run on the CPU). Writes JSON and a markdown table
under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from klotski.costs import ModelCosts, weight_dtype_of
from klotski.hardware import preset
from klotski.planner import InfeasibleError, Planner
from klotski.presets import model_config

# published decode throughput of the peers (tokens/s), with the workload they were measured on
PUBLISHED = {
    "a5000": ("MoE-Gen (arXiv 2503.09716)", 469.0, "Mixtral-8x7B bf16, one A5000, prompt 512, generate 256"),
    "l4": ("MoE-Lightning (arXiv 2411.11217)", 294.5, "Mixtral-8x7B, one L4, MTBench workload"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", nargs="*", default=["a5000", "l4", "t4"])
    ap.add_argument("--policies", nargs="*", default=["flexgen", "klotski"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-host-compute-sim.json)")
    args = ap.parse_args()
    cfg = model_config(args.model)
    costs = ModelCosts.from_config(cfg, name=args.model, weight_dtype=weight_dtype_of(cfg))
    rows = []
    head = ("| hardware | policy | host | batch x n | attention prefill/decode | cold experts on CPU | predicted tok/s "
            "| published tok/s | plan s |")
    lines = [head, "|" + "---|" * 9]
    for hw_name in args.hardware:
        hw = preset(hw_name)
        pub = PUBLISHED.get(hw.name)
        for policy in args.policies:
            for host in ("off", "search"):
                t0 = time.perf_counter()
                try:
                    plan = Planner(costs, hw, args.prompt_len, args.gen_len, host=host).plan(policy)
                except InfeasibleError:
                    plan = None
                dt = time.perf_counter() - t0
                row = {"model": args.model, "hardware": hw.name, "policy": policy, "host_search": host,
                       "prompt_len": args.prompt_len, "gen_len": args.gen_len, "plan_s": dt, "prediction": True}
                pub_s = f"{pub[1]:g} ({pub[0]})" if pub else ""
                if plan is None:
                    lines.append(f"| {hw.name} | {policy} | {host} | - | - | - | does not fit | {pub_s} | {dt:.1f} |")
                else:
                    row.update(batch_size=plan.batch_size, n=plan.n, tokens_per_s=plan.tokens_per_s,
                               prefill_attn=plan.host.prefill_attn, decode_attn=plan.host.decode_attn,
                               cold_experts=plan.host.experts, placement=plan.placement.describe(costs.spec.num_experts),
                               decode_step_s=plan.decode_step_s, prefill_s=plan.prefill_s,
                               cpu_expert_max_tokens=plan.extra.get("cpu_expert_max_tokens"))
                    lines.append(f"| {hw.name} | {policy} | {host} | {plan.batch_size} x {plan.n} | "
                                 f"{plan.host.prefill_attn}/{plan.host.decode_attn} | {plan.host.experts} | "
                                 f"{plan.tokens_per_s:.1f} | {pub_s} | {dt:.1f} |")
                if pub:
                    row["published"] = {"system": pub[0], "tokens_per_s": pub[1], "workload": pub[2]}
                rows.append(row)
                print(lines[-1], flush=True)
    out = args.out or os.path.join("bench", "results", time.strftime("%Y%m%d") + "-host-compute-sim.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"command": "python bench/sim/host_compute.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k != "out"), "note": "predictions (cost model + simulator on preset hardware), not measurements",
                   "rows": rows}, f, indent=2)
    os.replace(tmp, out)
    print("\n".join(["", *lines, "", f"wrote {out}"]))


if __name__ == "__main__":
    main()
