"""Microbenchmark: fused_moe vs the per-expert torch loop vs one dense matmul of the same FLOPs.

    python bench/kernels/bench_fused_moe.py                       # GPU: all models, M 1..8192, bf16
    python bench/kernels/bench_fused_moe.py --device cpu --small  # exercise the script on a CPU

Per row: time (median ms), TFLOP/s, GB/s, speed vs the loop, and for fused_moe its relative error
(max abs diff / max abs) against the loop. FLOPs = 6 * M * k * H * I (three matmuls per routed pair).
Bytes = the weights of the distinct experts routed to + hidden_states in + output out (the least any
implementation must move); for the dense matmul, its A, B and C. Writes JSON to bench/results/.
CPU figures are not GPU figures: on a CPU ``fused_moe`` runs the torch fallback (or with --interpret the
Triton interpreter), so only the script is exercised.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from moe_bench_common import (DEFAULT_M, DTYPES, MODELS, SMALL_M, device_description, make_tokens, make_weights,
                              setup_interpreter, time_ms)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--m", type=int, nargs="+", help="token counts (default 1..8192; --small: 1 16 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--small", action="store_true", help="H and I divided by 16 (for a CPU run)")
    p.add_argument("--interpret", action="store_true", help="run the Triton kernels in the CPU interpreter")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 3 CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/fused_moe_<device>.json)")
    return p.parse_args(argv)


def bench_one(shape, num_tokens, w13, w2, dtype, device, iters, fused_moe, fused_moe_torch):
    x, topk_weights, topk_ids = make_tokens(shape, num_tokens, dtype, device)
    H, I, k = shape.hidden, shape.inter, shape.top_k
    flops = 6 * num_tokens * k * H * I
    elt = w13.element_size()
    distinct = torch.unique(topk_ids).numel()
    moe_bytes = distinct * 3 * H * I * elt + 2 * num_tokens * H * elt
    a = torch.randn(num_tokens * k, H, device=device, dtype=dtype)
    b = torch.randn(H, 3 * I, device=device, dtype=dtype)
    dense_bytes = (a.numel() + b.numel() + num_tokens * k * 3 * I) * elt
    warmup = 3 if device == "cuda" else 1
    runs = {
        "fused_moe": (lambda: fused_moe(x, w13, w2, topk_weights, topk_ids), moe_bytes),
        "torch_loop": (lambda: fused_moe_torch(x, w13, w2, topk_weights, topk_ids), moe_bytes),
        "dense_matmul": (lambda: torch.matmul(a, b), dense_bytes),
    }
    # sanity: a fast wrong kernel is worth nothing (the loop computes in the same dtype, so ~1e-2 in bf16)
    got, ref = fused_moe(x, w13, w2, topk_weights, topk_ids).float(), fused_moe_torch(
        x, w13, w2, topk_weights, topk_ids).float()
    rel_err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    rows = []
    for impl, (fn, nbytes) in runs.items():
        ms = time_ms(fn, device, warmup=warmup, iters=iters)
        rows.append(dict(model=shape.name, M=num_tokens, impl=impl, ms=ms, tflops=flops / ms / 1e9,
                         gbps=nbytes / ms / 1e6, flops=flops, bytes=nbytes, distinct_experts=distinct,
                         rel_err_vs_loop=rel_err if impl == "fused_moe" else None))
    return rows


def print_table(rows, note):
    print(note)
    head = (f"{'model':<22}{'M':>6}  {'impl':<13}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}  {'vs loop':>8}"
            f"  {'rel.err':>8}")
    print(head)
    print("-" * len(head))
    loop = {(r["model"], r["M"]): r["ms"] for r in rows if r["impl"] == "torch_loop"}
    for r in rows:
        speedup = loop[(r["model"], r["M"])] / r["ms"]
        print(f"{r['model']:<22}{r['M']:>6}  {r['impl']:<13}{r['ms']:>10.4f}{r['tflops']:>10.3f}"
              f"{r['gbps']:>10.1f}  {speedup:>7.2f}x"
              + (f"  {r['rel_err_vs_loop']:>8.1e}" if r["rel_err_vs_loop"] is not None else ""))


def main(argv=None):
    args = parse_args(argv)
    setup_interpreter(args)
    from klotski.triton_kernels import fused_moe, fused_moe_torch
    from klotski.triton_kernels.fused_moe import interpreter_enabled

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device; use --device cpu --small")
    dtype = DTYPES[args.dtype]
    ms_list = args.m or (SMALL_M if args.small else DEFAULT_M)
    iters = args.iters or (20 if args.device == "cuda" else 3)
    if args.device == "cuda":
        path = "triton"
    else:
        path = "triton interpreter" if interpreter_enabled() else "torch fallback (no GPU, no interpreter)"
    note = (f"device: {device_description(args.device)}; dtype {args.dtype}; fused_moe path: {path}"
            + ("" if args.device == "cuda" else "\nCPU figures are not GPU figures: this run only exercises the script."))
    rows = []
    for key in args.models:
        shape = MODELS[key].small() if args.small else MODELS[key]
        w13, w2 = make_weights(shape, dtype, args.device)
        for m in ms_list:
            rows += bench_one(shape, m, w13, w2, dtype, args.device, iters, fused_moe, fused_moe_torch)
        del w13, w2
    print_table(rows, note)
    out = args.out or RESULTS / f"fused_moe_{args.device}{'_small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                device=device_description(args.device), fused_moe_path=path, dtype=args.dtype, small=args.small,
                torch=torch.__version__, python=platform.python_version(),
                note="CPU figures are not GPU figures" if args.device == "cpu" else "")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
