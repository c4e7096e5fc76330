"""``klotski demo``: prepare (once) the trained tiny MoE and generate from it offloaded.

By default the model runs under a device budget and a host budget that are each smaller than the model
(the rest streams from the packed expert store on disk), once per policy, and a metrics table compares
klotski, flexgen and layerwise; greedy tokens must agree across policies. ``--size tiny`` runs a synthetic
random-weight model instead (its text is noise).
"""
from __future__ import annotations

import os

from klotski.cli.compare import calibrate_first, compare_policies
from klotski.cli.generate import print_outputs
from klotski.cli.metrics_table import format_table
from klotski.cli.options import add_engine_args
from klotski.demo import DEMO_SIZES

# The trained model has read (a little of) the Python standard library: code and its docstrings.
DEFAULT_PROMPTS = ["def main():\n    ", "    return self.", "# Copyright", "    if not isinstance("]
DEMO_POLICIES = ("klotski", "flexgen", "layerwise")


def add_parser(sub):
    p = sub.add_parser("demo", help="run the built-in trained tiny MoE model offloaded (no download)")
    p.add_argument("--size", default="default", choices=DEMO_SIZES,
                   help="default: the trained tiny MoE; tiny: a synthetic random-weight model")
    p.add_argument("--model-dir", default=None, help="where the demo checkpoint lives (default: user cache)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", action="append", default=None)
    add_engine_args(p, policy_default="all")
    p.set_defaults(gpu_memory="16MiB", cpu_memory="8MiB")  # together < the model: 28 MiB in fp32 (14 MiB bf16 file)
    return p


def run(args) -> int:
    from klotski.demo import ensure_demo_checkpoint
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
    calibrate_first(args, path, policies, prompts=prompts, max_tokens=args.max_tokens)
    rows, _, agree = compare_policies(args, path, policies, prompts=prompts, max_tokens=args.max_tokens,
                                      on_first=lambda outputs: print_outputs(prompts, outputs))
    print()
    print(format_table(rows))
    if not agree:
        print("error: policies disagree on the greedy tokens")
        return 1
    if len(policies) > 1:
        print(f"greedy tokens identical across {', '.join(policies)}")
    return 0
