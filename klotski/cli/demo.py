"""``klotski demo``: build (once) the synthetic Mixtral-architecture model and generate from it offloaded.

By default the model runs under a device budget and a host budget that are each smaller than the model
(the rest streams from the packed expert store on disk), once per policy, and a metrics table compares
klotski, flexgen and layerwise; greedy tokens must agree across policies.
"""
from __future__ import annotations

import os

from klotski.cli.metrics_table import format_table, metrics_row
from klotski.cli.options import add_engine_args, build_llm, write_traces
from klotski.cli.generate import print_outputs

DEFAULT_PROMPTS = ["The expert-aware pipeline", "Klotski moves blocks", "Experts stream in while",
                   "A batch group shares"]
DEMO_POLICIES = ("klotski", "flexgen", "layerwise")


def add_parser(sub):
    p = sub.add_parser("demo", help="run the built-in synthetic MoE model offloaded (no download)")
    p.add_argument("--size", default="default", choices=("default", "tiny"))
    p.add_argument("--model-dir", default=None, help="where the demo checkpoint lives (default: user cache)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", action="append", default=None)
    add_engine_args(p, policy_default="all")
    p.set_defaults(gpu_memory="96MiB", cpu_memory="128MiB")
    return p


def run(args) -> int:
    from klotski.demo import ensure_demo_checkpoint
    from klotski.sampling import SamplingParams
    from klotski.units import format_bytes

    path = ensure_demo_checkpoint(args.size, args.model_dir)
    if args.offload_dir is None:
        args.offload_dir = os.path.join(path, "offload")
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    print(f"demo model: {path} ({format_bytes(size)} on disk)")
    prompts = args.prompt or DEFAULT_PROMPTS
    policies = DEMO_POLICIES if args.policy == "all" else (args.policy,)
    if any(p != "resident" for p in policies):
        print(f"budgets: device {args.gpu_memory}, host {args.cpu_memory}; disk tier in {args.offload_dir}")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows, tokens = [], {}
    for policy in policies:
        llm = build_llm(args, path, policy)
        try:
            outputs = llm.generate(prompts, params)
            tokens[policy] = [o.token_ids for o in outputs]
            if policy == policies[0]:
                print_outputs(prompts, outputs)
            rows.append(metrics_row(policy, llm.metrics))
            print(f"policy {policy}: {llm.metrics.tokens_per_s:.1f} tokens/s ({llm.device}, {llm.dtype})")
            write_traces(llm, args, suffix=policy if len(policies) > 1 else "")
        finally:
            llm.close()
    print()
    print(format_table(rows))
    if len({str(t) for t in tokens.values()}) > 1:
        print("error: policies disagree on the greedy tokens")
        return 1
    if len(policies) > 1:
        print(f"greedy tokens identical across {', '.join(policies)}")
    return 0
