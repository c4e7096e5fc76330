"""``klotski generate --model DIR --prompt TEXT``: generate from a checkpoint and print the outputs."""
from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--policy", default="resident", help="weight placement policy (default: resident)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    from klotski.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    add_engine_args(p)
    add_sampling_args(p)
    return p


def print_outputs(prompts, outputs) -> None:
    for prompt, out in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r}")
        print(f"    output: {out.text!r}")
        print(f"    tokens: {out.token_ids}")


def run(args) -> int:
    from klotski.engine import LLM

    llm = LLM(args.model, device=args.device, dtype=args.dtype, policy=args.policy)
    outputs = llm.generate(args.prompt, sampling_params(args), use_tqdm=True)
    print_outputs(args.prompt, outputs)
    m = llm.metrics
    print(f"{m.generated_tokens} tokens in {m.total_s:.2f} s: {m.tokens_per_s:.1f} tokens/s ({llm.device}, {llm.dtype})")
    return 0
