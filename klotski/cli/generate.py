"""``klotski generate --model DIR --prompt TEXT``: generate from a checkpoint and print the outputs."""
from __future__ import annotations

from klotski.cli.metrics_table import format_table, metrics_row
from klotski.cli.options import add_engine_args, add_sampling_args, build_llm, sampling_params, write_traces


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="> 1: that many local ranks under torchrun, experts streamed between them (FSE-DP)")
    return p


def print_outputs(prompts, outputs) -> None:
    for prompt, out in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r}")
        print(f"    output: {out.text!r}")
        print(f"    tokens: {out.token_ids}")


def run(args) -> int:
    if args.nproc != 1:
        from klotski.distributed.launch import run_nproc

        return run_nproc(args)
    llm = build_llm(args, args.model)
    try:
        outputs = llm.generate(args.prompt, sampling_params(args), use_tqdm=True)
        print_outputs(args.prompt, outputs)
        m = llm.metrics
        print(f"{m.generated_tokens} tokens in {m.total_s:.2f} s: {m.tokens_per_s:.1f} tokens/s "
              f"({llm.device}, {llm.dtype}, policy {llm.policy})")
        if llm.policy != "resident":
            print(format_table([metrics_row(llm.policy, m)]))
        write_traces(llm, args)
    finally:
        llm.close()
    return 0
