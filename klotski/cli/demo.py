"""``klotski demo``: build (once) the synthetic Mixtral-architecture model and generate from it."""
from __future__ import annotations

from klotski.cli.generate import add_engine_args, print_outputs

DEFAULT_PROMPTS = ["The expert-aware pipeline", "Klotski moves blocks"]


def add_parser(sub):
    p = sub.add_parser("demo", help="run the built-in synthetic MoE model (no download)")
    p.add_argument("--size", default="default", choices=("default", "tiny"))
    p.add_argument("--model-dir", default=None, help="where the demo checkpoint lives (default: user cache)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", action="append", default=None)
    add_engine_args(p)
    return p


def run(args) -> int:
    from klotski.demo import ensure_demo_checkpoint
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    path = ensure_demo_checkpoint(args.size, args.model_dir)
    print(f"demo model: {path}")
    prompts = args.prompt or DEFAULT_PROMPTS
    llm = LLM(path, device=args.device, dtype=args.dtype, policy=args.policy)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    print_outputs(prompts, outputs)
    m = llm.metrics
    print(f"policy {args.policy}: {m.generated_tokens} tokens in {m.total_s:.2f} s = {m.tokens_per_s:.1f} tokens/s "
          f"({llm.device}, {llm.dtype})")
    return 0
