"""Quantization error of ``klotski convert --quantize int4``: int4 experts vs the checkpoint's, same prompts.

    python bench/e2e/quant_error.py                               # a random Mixtral-shaped checkpoint (CPU)
    python bench/e2e/quant_error.py --model /path/to/trained-moe  # a trained checkpoint

For each int4 variant (``--group-size`` values x asymmetric / symmetric) the experts are quantized into a
store, and ``LLM(..., quantization="int4")`` (every expert resident, fp32 compute) is compared with the
resident engine on the original checkpoint (fp32 compute):

* logits over the prompts followed by the reference's greedy continuation (teacher forcing, so every position
  is compared on the same context): max |diff| / max |ref| and ||diff|| / ||ref|| per sequence (worst and mean),
  and top-1 agreement (argmax equal) over all positions;
* free-running greedy generation: the fraction of sequences identical, and the mean number of tokens
  generated before the first difference.

Prints a table and writes JSON to bench/results/. Random weights make near-uniform logits: figures on them
describe the arithmetic, not a model's quality; pass ``--model`` for a trained checkpoint.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import torch


def build_random(path: str, args) -> None:
    """The random Mixtral-shaped checkpoint of bench/e2e/bench_offload.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("bench_offload", os.path.join(here, "bench_offload.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.build_checkpoint(path, args)


def compare(ref_llm, q_llm, prompts, gen_len: int) -> dict:
    from klotski import SamplingParams

    sp = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    ref_tokens = [o.token_ids for o in ref_llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    q_tokens = [o.token_ids for o in q_llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    forced = [p + t for p, t in zip(prompts, ref_tokens)]
    max_rel, l2_rel, agree, total = [], [], 0, 0
    for ref, got in zip(ref_llm.logits(forced), q_llm.logits(forced)):
        ref, got = ref.double(), got.double()
        max_rel.append(float((got - ref).abs().max() / ref.abs().max()))
        l2_rel.append(float((got - ref).norm() / ref.norm()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    prefix = []
    for a, b in zip(ref_tokens, q_tokens):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix.append(n)
    return {"logit_max_rel_worst": max(max_rel), "logit_max_rel_mean": sum(max_rel) / len(max_rel),
            "logit_l2_rel_worst": max(l2_rel), "logit_l2_rel_mean": sum(l2_rel) / len(l2_rel),
            "top1_agreement": agree / total, "positions": total,
            "greedy_sequences_identical": sum(a == b for a, b in zip(ref_tokens, q_tokens)) / len(prompts),
            "greedy_tokens_before_first_difference_mean": sum(prefix) / len(prefix)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random Mixtral-shaped one)")
    ap.add_argument("--group-size", type=int, nargs="+", default=[128])
    ap.add_argument("--clip-search", action="store_true", help="also run each variant with the range search")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the random checkpoint")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = ap.parse_args()

    from klotski import LLM
    from klotski.store import convert_checkpoint

    work = tempfile.mkdtemp(prefix="klotski-qerr-")
    atexit.register(shutil.rmtree, work, True)
    model = args.model or os.path.join(work, "model")
    if not args.model:
        build_random(model, args)
    ref = LLM(model, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, ref.spec.vocab_size, (args.num_prompts, args.prompt_len), generator=g).tolist()
    rows = []
    for group in args.group_size:
        for symmetric, clip in [(s, c) for s in (False, True) for c in ((False, True) if args.clip_search else (False,))]:
            store = os.path.join(work, f"store-g{group}-{'sym' if symmetric else 'asym'}{'-clip' if clip else ''}")
            t0 = time.perf_counter()
            manifest = convert_checkpoint(model, store, quantize="int4", group_size=group, symmetric=symmetric,
                                          clip_search=clip)
            convert_s = time.perf_counter() - t0
            q = LLM(model, device="cpu", dtype="float32", policy="klotski", gpu_memory=None, cpu_memory=None,
                    offload_dir=store, quantization="int4")
            row = {"group_size": group, "symmetric": symmetric, "clip_search": clip, "convert_s": convert_s,
                   "expert_record_bytes": manifest["experts"][0]["nbytes"], **compare(ref, q, prompts, args.gen_len)}
            q.close()
            shutil.rmtree(store, ignore_errors=True)
            rows.append(row)
            print(f"group {group} {'sym ' if symmetric else 'asym'}{' clip' if clip else ''}: logits max-rel worst {row['logit_max_rel_worst']:.3e} "
                  f"mean {row['logit_max_rel_mean']:.3e}, l2-rel mean {row['logit_l2_rel_mean']:.3e}, top-1 agreement "
                  f"{row['top1_agreement']:.1%} of {row['positions']}, greedy identical {row['greedy_sequences_identical']:.0%}, "
                  f"tokens before first difference {row['greedy_tokens_before_first_difference_mean']:.1f}/{args.gen_len}",
                  flush=True)
    ref.close()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"int4-quant-error-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "model": args.model or "random (bench_offload.build_checkpoint)",
                   "reference": "resident engine, original checkpoint, fp32 compute", "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
