"""Tune fused_moe's kernel configs and write them as JSON per (E, N, device), keyed by M.

    python bench/kernels/tune_fused_moe.py --models qwen3-30b-a3b            # GPU, writes triton_kernels/configs
    python bench/kernels/tune_fused_moe.py --shape 8,96,200,2 --interpret --m 7 33 130   # CPU interpreter

For every M, every config of the search space runs the whole ``invoke_fused_moe`` (align, both GEMMs,
combine) on random routing; the fastest is kept and checked against ``fused_moe_torch``. Configs whose
tiles would not fit in shared memory are skipped, as are configs that fail to compile. The output file is
``E={E},N={I},device_name={device}.json`` in --out-dir (default: the package's configs folder on a GPU,
bench/results/configs under the interpreter, so interpreter timings never overwrite shipped files unasked).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from moe_bench_common import (DEFAULT_M, DTYPES, MODELS, MoEShape, device_description, make_tokens, make_weights,
                              setup_interpreter, time_ms)

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", choices=sorted(MODELS), default=[])
    p.add_argument("--shape", action="append", default=[], metavar="E,H,I,K",
                   help="an extra shape: num_experts,hidden,intermediate,top_k (repeatable)")
    p.add_argument("--m", type=int, nargs="+", default=None, help="token counts (default 1..8192)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activations (and 16-bit weights)")
    p.add_argument("--int4", action="store_true", help="tune the int4 (w4a16) kernels: weights quantized "
                                                        "(group 128 or the largest power of two dividing H and I); "
                                                        "writes the ',dtype=int4_w4a16' files")
    p.add_argument("--interpret", action="store_true", help="tune for the CPU interpreter (device 'interpreter')")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per config (default 20 GPU, 1 CPU)")
    p.add_argument("--smem-kb", type=int, default=None, help="shared memory per block (default: the device's)")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.models and not args.shape:
        p.error("give --models and/or --shape")
    return args


def parse_shape(text: str) -> MoEShape:
    try:
        e, h, i, k = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--shape must be E,H,I,K integers, got {text!r}")
    return MoEShape(f"E{e}-H{h}-I{i}-k{k}", h, i, e, k)


def search_space(interpret: bool, num_tokens: int, shape: MoEShape, elt: int, smem_bytes: int):
    """Candidate configs for M = num_tokens, pruned by shared memory and by block height vs pairs per expert."""
    if interpret:
        grid = dict(BLOCK_M=[16, 32], BLOCK_N=[64, 128], BLOCK_K=[64, 128], GROUP_M=[1], num_warps=[4],
                    num_stages=[1])
    else:
        grid = dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[32, 64, 128, 256], BLOCK_K=[32, 64, 128, 256],
                    GROUP_M=[1, 16], num_warps=[4, 8], num_stages=[2, 3, 4, 5])
    pairs_per_expert = num_tokens * shape.top_k / shape.num_experts
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values))
        if cfg["BLOCK_M"] > max(16, 2 * pairs_per_expert) or cfg["BLOCK_M"] > 16 * max(1, num_tokens):
            continue  # taller blocks would be mostly padding
        # gemm1 streams one x tile and two weight tiles (gate, up) per stage
        stage_bytes = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elt
        if not interpret and stage_bytes * cfg["num_stages"] > smem_bytes:
            continue
        yield cfg


def shared_memory_bytes(args) -> int:
    if args.smem_kb:
        return args.smem_kb * 1024
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    return 1 << 30


def tune_shape(shape, ms, dtype, device, iters, smem, interpret, invoke, reference, rel_error, int4=False):
    w13, w2 = make_weights(shape, dtype, device)
    dense13, dense2 = w13.float(), w2.float()
    elt = w13.element_size()
    if int4:
        from klotski.quant import quantize_int4

        group = 128
        while group > 2 and (shape.hidden % group or shape.inter % group):
            group //= 2
        w13, w2 = (quantize_int4(w.float(), group, scale_dtype=dtype) for w in (w13, w2))
        dense13, dense2 = w13.dequantize(), w2.dequantize()
    table = {}
    for m in ms:
        x, topk_weights, topk_ids = make_tokens(shape, m, dtype, device)
        ref = reference(x.float(), dense13, dense2, topk_weights, topk_ids)
        best = None
        for cfg in search_space(interpret, m, shape, elt, smem):
            try:
                fn = lambda cfg=cfg: invoke(x, w13, w2, topk_weights, topk_ids, config=cfg)  # noqa: E731
                ms_taken = time_ms(fn, device, warmup=1 if interpret else 3, iters=iters)
            except Exception as err:  # out of resources, compile errors: skip the config
                print(f"  skip {cfg}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            if best is None or ms_taken < best[0]:
                best = (ms_taken, cfg)
        if best is None:
            raise SystemExit(f"{shape.name} M={m}: no config ran")
        got = invoke(x, w13, w2, topk_weights, topk_ids, config=best[1])
        err = rel_error(got, ref)
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-3
        if not err <= tolerance:
            raise SystemExit(f"{shape.name} M={m}: best config {best[1]} gives rel. error {err:.2e}")
        print(f"{shape.name:<22} M={m:<6} {best[0]:9.4f} ms  {best[1]}")
        table[str(m)] = best[1]
    return table


def main(argv=None):
    args = parse_args(argv)
    setup_interpreter(args)
    from klotski.triton_kernels import fused_moe_torch, invoke_fused_moe
    from klotski.triton_kernels.config import CONFIG_DIR, INT4_DTYPE, config_file_name, device_name_of

    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: tune for the interpreter with --interpret (small shapes only)")
    device_name = device_name_of(torch.device(device), args.interpret)
    out_dir = args.out_dir or (ROOT / "bench" / "results" / "configs" if args.interpret else CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    if args.interpret and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter upcasts bf16 anyway; time the code path it runs
    ms = args.m or DEFAULT_M
    iters = args.iters or (1 if args.interpret else 20)

    def rel_error(got, ref):
        return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    print(f"tuning on {device_description(device)} (config device name {device_name!r}), dtype {dtype}")
    shapes = [MODELS[k] for k in args.models] + [parse_shape(s) for s in args.shape]
    for shape in shapes:
        table = tune_shape(shape, ms, dtype, device, iters, shared_memory_bytes(args), args.interpret,
                           invoke_fused_moe, fused_moe_torch, rel_error, int4=args.int4)
        path = out_dir / config_file_name(shape.num_experts, shape.inter, device_name,
                                          INT4_DTYPE if args.int4 else None)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
