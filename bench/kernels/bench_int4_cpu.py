"""Where an offloaded expert's time goes on the CPU path, bf16 vs int4, paired in one invocation.

    python bench/kernels/bench_int4_cpu.py --hidden 1024 --inter 4096 --tokens 1 4 16 --repeats 7

Per expert of [H, I] (w13 [2I, H], w2 [H, I]) and per token count M, the median of ``--repeats`` interleaved
repetitions of:

* ``read``: one O_DIRECT read of the expert's stored bytes (bf16: 6 H I bytes; int4 at ``--group-size`` with
  zero points: the store record's codes + scales + zero points) from a file of ``--experts`` distinct experts
  on ``--dir`` (page cache bypassed; the experts are read in turn);
* ``load``: what the runtime does to a loaded expert before computing on the CPU: bf16 -> fp32 copy into the
  fp32 slot; int4: the codes + scales copied into the int4 slot as they are;
* ``moe``: ``fused_moe_torch`` over that slot for M tokens routed to it (int4: dequantizes the slot to fp32,
  then the same fp32 matmuls; this is the exact reference the CPU runtime runs);
* ``dequant``: the int4 dequantization alone (``klotski.quant.dequantize_int4`` of w13 and w2 into the slot
  pool's reused fp32 buffer, as ``moe`` does); ``dequant_fresh``: the same into newly allocated tensors;
  ``dequant_torch``: the torch-op reference (``dequantize_int4_torch``, fresh tensors: the CPU path before the
  host kernel and the pool's buffer);
* ``int4mm_bf16`` (not used by Klotski; for comparison): torch's CPU int4 weight-only matmul
  (``aten._weight_int4pack_mm_for_cpu``, bf16 activations; its own zero-point convention, so not exact) over
  w13 and w2, with and without the per-load repacking (``_convert_weight_to_int4pack_for_cpu``) it needs.

Prints a table and writes JSON under bench/results/. The per-expert sum ``read + load + moe`` bounds a serial
load-then-compute; the runtime overlaps loads with compute, so max(read, load + moe) is the overlapped bound.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import tempfile
import time

import torch


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class DirectFile:
    """``count`` records of ``nbytes`` each (4 KiB aligned) in a temporary file on ``directory``, read with O_DIRECT."""

    def __init__(self, directory: str, nbytes: int, count: int):
        self.stride = -(-nbytes // 4096) * 4096
        self.nbytes, self.count, self.next = nbytes, count, 0
        fd, self.path = tempfile.mkstemp(dir=directory, suffix=".bench")
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(-(-self.stride * count // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        self.buf = mmap.mmap(-1, self.stride)

    def read(self) -> None:
        got = os.preadv(self.fd, [self.buf], self.next * self.stride)
        if got < self.nbytes:
            raise OSError(f"short read {got} < {self.nbytes}")
        self.next = (self.next + 1) % self.count

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()
        os.remove(self.path)


def int4mm_fn(w, x_bf16, repack: bool):
    """torch's CPU int4 matmul over an Int4Weight [N, K] (zero point as a float offset: (q - 8) * s + (8 - z) * s)."""
    from klotski.quant.int4 import unpack_int4

    codes = unpack_int4(w.qweight).to(torch.int32).contiguous()
    s = w.scales.float()
    z = (8 - (w.zeros.float() if w.zeros is not None else torch.full_like(s, 8))) * s
    sz = torch.stack([s.t(), z.t()], -1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    def run():
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1) if repack else packed
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, p, w.group_size, sz)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8, help="distinct experts in the read file")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "..", "results"),
                    help="directory on the disk to read from")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = ap.parse_args()

    from klotski.quant.int4 import Int4Weight, dequantize_int4_torch, quantize_int4
    from klotski.triton_kernels.fused_moe import fused_moe_torch

    H, inter, G = args.hidden, args.inter, args.group_size
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(2 * inter, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(H, inter, generator=g) * inter ** -0.5).to(torch.bfloat16)
    q13, q2 = quantize_int4(w13.float(), G, False, torch.bfloat16), quantize_int4(w2.float(), G, False, torch.bfloat16)
    bf16_bytes = (w13.numel() + w2.numel()) * 2
    int4_bytes = q13.nbytes + q2.nbytes
    slot13, slot2 = torch.empty(1, 2 * inter, H), torch.empty(1, H, inter)
    islot13 = Int4Weight.empty((1, 2 * inter, H), G, False, torch.bfloat16)
    islot2 = Int4Weight.empty((1, H, inter), G, False, torch.bfloat16)
    islot13[0].copy_(q13)
    islot2[0].copy_(q2)
    slot13[0].copy_(w13)
    slot2[0].copy_(w2)
    files = {"bf16": DirectFile(args.dir, bf16_bytes, args.experts), "int4": DirectFile(args.dir, int4_bytes, args.experts)}
    rows = []
    try:
        for m in args.tokens:
            x = torch.randn(m, H, generator=g)
            ids = torch.zeros(m, 1, dtype=torch.int64)
            wts = torch.ones(m, 1)
            xb = x.to(torch.bfloat16)
            fns = {
                ("bf16", "read"): files["bf16"].read,
                ("int4", "read"): files["int4"].read,
                ("bf16", "load"): lambda: (slot13[0].copy_(w13), slot2[0].copy_(w2)),
                ("int4", "load"): lambda: (islot13[0].copy_(q13), islot2[0].copy_(q2)),
                ("bf16", "moe"): lambda: fused_moe_torch(x, slot13, slot2, wts, ids),
                ("int4", "moe"): lambda: fused_moe_torch(x, islot13, islot2, wts, ids),
                ("int4", "dequant"): lambda: (islot13[0].dequantize(reuse=True), islot2[0].dequantize(reuse=True)),
                ("int4", "dequant_fresh"): lambda: (q13.dequantize(), q2.dequantize()),
                ("int4", "dequant_torch"): lambda: tuple(dequantize_int4_torch(q.qweight, q.scales, q.zeros, G)
                                                         for q in (q13, q2)),
            }
            try:
                a13, a2 = int4mm_fn(q13, xb, False), int4mm_fn(q2, torch.zeros(m, inter, dtype=torch.bfloat16), False)
                r13, r2 = int4mm_fn(q13, xb, True), int4mm_fn(q2, torch.zeros(m, inter, dtype=torch.bfloat16), True)
                fns[("int4", "int4mm_bf16")] = lambda: (a13(), a2())
                fns[("int4", "int4mm_bf16+repack")] = lambda: (r13(), r2())
            except (RuntimeError, AttributeError) as e:  # op missing in this torch build
                print(f"aten._weight_int4pack_mm_for_cpu unavailable: {e}")
            samples = {k: [] for k in fns}
            for f in fns.values():
                f()  # warm up
            for _ in range(args.repeats):  # interleaved: machine load hits every variant alike
                for k, f in fns.items():
                    samples[k] += timed(f, 1)
            for (fmt, what), s in samples.items():
                rows.append({"tokens": m, "format": fmt, "what": what, "median_ms": 1e3 * statistics.median(s),
                             "min_ms": 1e3 * min(s), "bytes": bf16_bytes if fmt == "bf16" else int4_bytes})
    finally:
        for f in files.values():
            f.close()
    print(f"expert [H={H}, I={inter}]: bf16 {bf16_bytes / 2**20:.2f} MiB, int4 group {G} zero points "
          f"{int4_bytes / 2**20:.2f} MiB; median (min) of {args.repeats} interleaved repeats, ms per expert")
    print(f"{'M':>4} {'format':>6} {'what':>20} {'median ms':>10} {'min ms':>8}")
    for r in rows:
        print(f"{r['tokens']:>4} {r['format']:>6} {r['what']:>20} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f}")
    for m in args.tokens:
        get = lambda fmt, what: next((r["median_ms"] for r in rows if r["tokens"] == m and r["format"] == fmt  # noqa: E731
                                      and r["what"] == what), 0.0)
        serial = {f: get(f, "read") + get(f, "load") + get(f, "moe") for f in ("bf16", "int4")}
        overlap = {f: max(get(f, "read"), get(f, "load") + get(f, "moe")) for f in ("bf16", "int4")}
        print(f"M={m}: per-expert bound bf16/int4 serial {serial['bf16']:.2f}/{serial['int4']:.2f} ms "
              f"({serial['bf16'] / serial['int4']:.2f}x), overlapped {overlap['bf16']:.2f}/{overlap['int4']:.2f} ms "
              f"({overlap['bf16'] / overlap['int4']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"int4-cpu-expert-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "load_avg": os.getloadavg(), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
