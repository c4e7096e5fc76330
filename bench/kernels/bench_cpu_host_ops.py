"""Host compute on this CPU: decode attention over a host KV cache and one routed expert from its host copy, with
the torch kernels the runtime uses (``klotski.model.decoder.ATTENTION_SPLIT`` cores, ``fused_moe_torch``).

    python bench/kernels/bench_cpu_host_ops.py [--threads N] [--dtype float32|bfloat16]

Reports GFLOP/s and GB/s of KV (or expert weights) read next to this machine's memory bandwidth (a large copy,
read + write bytes, as ``klotski profile`` measures it), for Mixtral-8x7B's attention shape (32 heads, 8 KV heads,
head dim 128) and expert shape (hidden 4096, intermediate 14336). Decode attention reads every KV byte once: at
the memory bandwidth it is bound by the KV read, so "KV GB/s / memory GB/s" is what a dedicated kernel could
still gain. The runtime's decode path (one matmul per KV head's query group) is paired with the SDPA call it
replaced (``enable_gqa``), alternating, in one invocation. Writes JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from klotski.model.attention import gqa_core
from klotski.model.kv_cache import KVCache
from klotski.triton_kernels.fused_moe import fused_moe_torch


class _Spec:  # the fields gqa_core reads (Mixtral-8x7B)
    head_dim, num_heads, num_kv_heads = 128, 32, 8


def best(fn, reps: int = 5) -> float:
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def memory_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / best(lambda: dst.copy_(src))


def attention_row(B: int, L: int, dtype) -> dict:
    s = _Spec
    cache = KVCache(1, B, L + 1, torch.zeros(B, dtype=torch.long))
    cache.layers[0]["k"] = torch.randn(B, s.num_kv_heads, L + 1, s.head_dim, dtype=dtype)
    cache.layers[0]["v"] = torch.randn(B, s.num_kv_heads, L + 1, s.head_dim, dtype=dtype)
    cache.length = L
    q = torch.randn(B, s.num_heads, 1, s.head_dim, dtype=dtype)
    k = torch.randn(B, s.num_kv_heads, 1, s.head_dim, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.ones(B, 1, 1, L + 1, dtype=torch.bool)
    keys, values = cache.layers[0]["k"], cache.layers[0]["v"]
    runs = {"decode attention": lambda: gqa_core(s, (q, k, v), cache, 0, mask),  # the runtime's (grouped matmuls)
            "  (SDPA, gqa)": lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                    scale=s.head_dim ** -0.5, enable_gqa=True)}
    kv_bytes = 2 * B * (L + 1) * s.num_kv_heads * s.head_dim * cache.layers[0]["k"].element_size()
    flops = 2.0 * B * (L + 1) * s.num_heads * 2 * s.head_dim
    rows = []
    for op, fn in list(runs.items()) * 2:  # paired, alternating; the best of both rounds is kept per op
        sec = best(fn)
        prev = next((r for r in rows if r["op"] == op), None)
        if prev is None:
            rows.append({"op": op, "batch": B, "context": L, "seconds": sec})
        else:
            prev["seconds"] = min(prev["seconds"], sec)
    for r in rows:
        r.update(gflops=flops / r["seconds"] / 1e9, read_gbs=kv_bytes / r["seconds"] / 1e9)
    return rows


def expert_row(tokens: int, dtype, H: int = 4096, inter: int = 14336) -> dict:
    w13 = torch.randn(1, 2 * inter, H, dtype=dtype) * 0.01
    w2 = torch.randn(1, H, inter, dtype=dtype) * 0.01
    x = torch.randn(tokens, H, dtype=dtype)
    ids = torch.zeros(tokens, 1, dtype=torch.int32)
    tw = torch.ones(tokens, 1, dtype=torch.float32)
    out = torch.zeros(tokens, H, dtype=torch.float32)
    sec = best(lambda: fused_moe_torch(x, w13, w2, tw, ids, out=out), reps=3)
    wbytes = (w13.numel() + w2.numel()) * w13.element_size()
    return {"op": "one expert", "tokens": tokens, "seconds": sec, "gflops": 2.0 * tokens * 3 * H * inter / sec / 1e9,
            "read_gbs": wbytes / sec / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    bw = memory_bandwidth()
    rows = [r for B, L in ((1, 4096), (8, 1024), (8, 4096), (32, 1024)) for r in attention_row(B, L, dtype)]
    rows += [expert_row(t, dtype) for t in (1, 8, 32)]
    print(f"memory bandwidth (copy, read + write): {bw / 1e9:.1f} GB/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'op':<17} {'shape':>14} {'ms':>9} {'GFLOP/s':>9} {'read GB/s':>10} {'of mem bw':>10}")
    for r in rows:
        shape = f"B{r['batch']} L{r['context']}" if "context" in r else f"{r['tokens']} tokens"
        print(f"{r['op']:<17} {shape:>14} {r['seconds'] * 1e3:>9.2f} {r['gflops']:>9.1f} {r['read_gbs']:>10.2f} "
              f"{r['read_gbs'] * 1e9 / bw:>10.1%}")
    out = args.out or os.path.join("bench", "results", time.strftime("%Y%m%d") + "-cpu-host-ops.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"command": "python bench/kernels/bench_cpu_host_ops.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
            "memory_bandwidth_gbs": bw / 1e9, "threads": torch.get_num_threads(), "dtype": args.dtype,
            "rows": rows}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
