"""Microbenchmark: fused_moe vs the per-expert torch loop vs one dense matmul of the same FLOPs.

    python bench/kernels/bench_fused_moe.py                       # GPU: all models, M 1..8192, bf16
    python bench/kernels/bench_fused_moe.py --device cpu --small  # exercise the script on a CPU
    python bench/kernels/bench_fused_moe.py --dtype int4          # GPU: int4 experts (w4a16), bf16 activations

Per row: time (median ms), TFLOP/s, GB/s, speed vs the loop, and for fused_moe its relative error
(max abs diff / max abs) against the loop. FLOPs = 6 * M * k * H * I (three matmuls per routed pair).
Bytes = the weights of the distinct experts routed to + hidden_states in + output out (the least any
implementation must move); for the dense matmul, its A, B and C. Writes JSON to bench/results/.
``--dtype int4``: the experts are int4 (round-to-nearest, ``--group-size``, zero points unless ``--symmetric``;
activations ``--act-dtype``, bf16 by default); bytes count the int4 codes + scales + zero points of the touched
experts, the loop is ``fused_moe_torch`` over the int4 pool (one slot dequantized at a time), and one more row,
``fused_moe_dense``, runs the 16-bit kernel over the same weights dequantized (what int4 saves or costs).
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
    p.add_argument("--dtype", choices=sorted(DTYPES) + ["int4"], default="bf16")
    p.add_argument("--act-dtype", choices=sorted(DTYPES), default="bf16", help="--dtype int4: activations")
    p.add_argument("--group-size", type=int, default=128, help="--dtype int4: input columns per scale "
                                                                 "(halved until it divides H and I)")
    p.add_argument("--symmetric", action="store_true", help="--dtype int4: no zero points")
    p.add_argument("--small", action="store_true", help="H and I divided by 16 (for a CPU run)")
    p.add_argument("--interpret", action="store_true", help="run the Triton kernels in the CPU interpreter")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 3 CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/fused_moe_<device>.json)")
    return p.parse_args(argv)


def bench_one(shape, num_tokens, w13, w2, dtype, device, iters, fused_moe, fused_moe_torch, dense=None):
    """``dense``: (w13, w2) in ``dtype`` to also time the 16-bit kernel on (int4 runs: the dequantized pool)."""
    x, topk_weights, topk_ids = make_tokens(shape, num_tokens, dtype, device)
    H, I, k = shape.hidden, shape.inter, shape.top_k
    flops = 6 * num_tokens * k * H * I
    elt = x.element_size()
    distinct = torch.unique(topk_ids).numel()
    expert_bytes = (w13[0].nbytes + w2[0].nbytes) if dense is not None else 3 * H * I * elt
    moe_bytes = distinct * expert_bytes + 2 * num_tokens * H * elt
    a = torch.randn(num_tokens * k, H, device=device, dtype=dtype)
    b = torch.randn(H, 3 * I, device=device, dtype=dtype)
    dense_bytes = (a.numel() + b.numel() + num_tokens * k * 3 * I) * elt
    warmup = 3 if device == "cuda" else 1
    runs = {
        "fused_moe": (lambda: fused_moe(x, w13, w2, topk_weights, topk_ids), moe_bytes),
        "torch_loop": (lambda: fused_moe_torch(x, w13, w2, topk_weights, topk_ids), moe_bytes),
        "dense_matmul": (lambda: torch.matmul(a, b), dense_bytes),
    }
    if dense is not None:
        runs["fused_moe_dense"] = (lambda: fused_moe(x, dense[0], dense[1], topk_weights, topk_ids),
                                   distinct * 3 * H * I * elt + 2 * num_tokens * H * elt)
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


def memory_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Measured memory bandwidth in bytes/s: a 1 GiB (CPU: 256 MiB) device-to-device copy, read + write."""
    n = (1 << 30 if device == "cuda" else 1 << 28) // torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, iters=10)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def check_targets(rows, hbm_bytes_per_s: float) -> list[dict]:
    """Issue #3's targets per (model, M): fused_moe never slower than the per-expert loop; at M >= 4096 at least
    70 % of the dense matmul's TFLOP/s; at M <= 64 within 1.3x of the time to read the touched weights (and
    the tokens) at the measured memory bandwidth."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["M"]), {})[r["impl"]] = r
    out = []
    for (model, m), impls in by.items():
        fused, loop, dense = impls["fused_moe"], impls["torch_loop"], impls["dense_matmul"]
        checks = {"vs_loop": (loop["ms"] / fused["ms"], loop["ms"] / fused["ms"] >= 1.0)}
        if m >= 4096:
            ratio = fused["tflops"] / dense["tflops"]
            checks["vs_dense"] = (ratio, ratio >= 0.7)
        if m <= 64:
            floor_ms = fused["bytes"] / hbm_bytes_per_s * 1e3
            ratio = fused["ms"] / floor_ms
            checks["vs_weight_read"] = (ratio, ratio <= 1.3)
        out.append(dict(model=model, M=m, **{k: {"ratio": v, "met": ok} for k, (v, ok) in checks.items()}))
    return out


def print_targets(targets, hbm_bytes_per_s: float) -> None:
    print(f"\ntargets (measured memory bandwidth {hbm_bytes_per_s / 1e9:.0f} GB/s): loop ms / fused ms >= 1; "
          "fused / dense TFLOP/s >= 0.70 at M >= 4096; fused ms / weight-read ms <= 1.3 at M <= 64")
    print(f"{'model':<22}{'M':>6}  {'vs loop':>12}  {'vs dense':>12}  {'vs weight read':>15}")
    for t in targets:
        cell = lambda key: (f"{t[key]['ratio']:.2f} {'ok' if t[key]['met'] else 'MISS'}" if key in t else "-")  # noqa: E731
        print(f"{t['model']:<22}{t['M']:>6}  {cell('vs_loop'):>12}  {cell('vs_dense'):>12}  {cell('vs_weight_read'):>15}")
    missed = sum(1 for t in targets for k in ("vs_loop", "vs_dense", "vs_weight_read") if k in t and not t[k]["met"])
    print(f"{missed} target check(s) missed of {sum(1 for t in targets for k in t if k.startswith('vs_'))}")


def main(argv=None):
    args = parse_args(argv)
    setup_interpreter(args)
    from klotski.triton_kernels import fused_moe, fused_moe_torch
    from klotski.triton_kernels.fused_moe import interpreter_enabled

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device; use --device cpu --small")
    dtype = DTYPES[args.act_dtype if args.dtype == "int4" else args.dtype]
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
        dense = None
        if args.dtype == "int4":
            from klotski.quant import quantize_int4

            group = args.group_size
            while group > 2 and (shape.hidden % group or shape.inter % group):
                group //= 2
            w13, w2 = (quantize_int4(w.float(), group, args.symmetric, scale_dtype=dtype) for w in (w13, w2))
            dense = (w13.dequantize(dtype), w2.dequantize(dtype))
        for m in ms_list:
            rows += bench_one(shape, m, w13, w2, dtype, args.device, iters, fused_moe, fused_moe_torch, dense)
        del w13, w2, dense
    print_table(rows, note)
    bandwidth = memory_bandwidth(args.device, dtype)
    targets = check_targets(rows, bandwidth)
    print_targets(targets, bandwidth)
    out = args.out or RESULTS / (f"fused_moe_{args.device}{'_small' if args.small else ''}"
                                 f"{'_int4' if args.dtype == 'int4' else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                device=device_description(args.device), fused_moe_path=path, dtype=args.dtype, small=args.small,
                torch=torch.__version__, python=platform.python_version(),
                note="CPU figures are not GPU figures" if args.device == "cpu" else "")
    meta["memory_bandwidth_bytes_per_s"] = bandwidth
    out.write_text(json.dumps(dict(meta=meta, rows=rows, targets=targets), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
