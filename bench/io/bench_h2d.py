"""Host-to-device copy throughput: klotski ring slots (cudaHostRegister'd, copied by klotski._C on a side
stream) vs torch's own pinned-memory copy (``torch.empty(pin_memory=True)`` + ``copy_(non_blocking=True)``),
per copy size. Needs CUDA; without it the script says so and exits with status 2.

    python bench/io/bench_h2d.py --sizes 1M,16M,64M,256M --slots 4 --out bench/results/h2d_<gpu>.json

Each cell: ``--iters`` copies of one size back to back on one stream, timed with CUDA events after a warm-up;
GB/s = 1e9 bytes/s. The ring copies cycle through all slots (as the runtime streams experts). A pageable
column (``torch.empty`` without pinning, the copy torch stages itself) shows what pinning buys.

Overlap (largest size): ring copies on the side stream while bf16 matmuls run on the compute stream, timed
with events on both; overlap = (t_copies + t_matmuls - t_both) / min(t_copies, t_matmuls): 1.0 = the shorter
one hidden entirely, 0 = serialised. Target (issue #4): ring >= 90 % of torch's pinned rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def measure_overlap(torch, device, copy_stream, copy, iters: int) -> dict:
    """Copies (``copy(i)``, issued on ``copy_stream``) alone, bf16 matmuls on the current stream alone, then
    both at once; CUDA events on both streams give each side's interval in the concurrent run."""
    compute = torch.cuda.current_stream(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731

    def matmuls(n):
        for _ in range(n):
            torch.mm(a, b)

    def copies():
        for i in range(iters):
            copy(i)

    matmuls(2)
    torch.cuda.synchronize(device)
    s, e = ev(), ev()
    s.record(copy_stream)
    copies()
    e.record(copy_stream)
    e.synchronize()
    copies_ms = s.elapsed_time(e)
    s, e = ev(), ev()
    s.record(compute)
    matmuls(1)
    e.record(compute)
    e.synchronize()
    n = max(1, round(copies_ms / max(s.elapsed_time(e), 1e-3)))  # about as long as the copies
    s.record(compute)
    matmuls(n)
    e.record(compute)
    e.synchronize()
    matmuls_ms = s.elapsed_time(e)
    start, mm_end, cp_start, cp_end = ev(), ev(), ev(), ev()
    start.record(compute)
    copy_stream.wait_event(start)
    cp_start.record(copy_stream)
    copies()
    cp_end.record(copy_stream)
    matmuls(n)
    mm_end.record(compute)
    torch.cuda.synchronize(device)
    both_ms = max(start.elapsed_time(mm_end), start.elapsed_time(cp_end))
    intervals = start.elapsed_time(cp_start) < start.elapsed_time(mm_end) and start.elapsed_time(cp_end) > 0
    return {"copies_ms": copies_ms, "matmuls_ms": matmuls_ms, "both_ms": both_ms, "matmuls": n,
            "overlap": (copies_ms + matmuls_ms - both_ms) / min(copies_ms, matmuls_ms),
            "intervals_overlap": bool(intervals)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,4M,16M,64M,256M")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default="bench/results/h2d.json")
    args = p.parse_args(argv)

    import torch

    from klotski.io import CopyEngine, PinnedRing, cuda_available, cuda_info

    if not torch.cuda.is_available() or not cuda_available():
        print(f"bench_h2d needs a CUDA GPU (torch.cuda.is_available()={torch.cuda.is_available()}, "
              f"klotski CUDA loader: {cuda_info()['reason'] or 'ok'}); nothing measured.")
        return 2
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    engine = CopyEngine(device)
    stream = torch.cuda.Stream(device)
    rows, overlap = [], None
    print(f"{'size':>10} {'klotski ring':>14} {'torch pinned':>14} {'ratio':>7} {'pageable':>10}   "
          f"(GB/s, {torch.cuda.get_device_name(device)})")
    for size in sizes:
        ring = PinnedRing(args.slots, size, pin="cuda")
        slots = [ring.acquire() for _ in range(args.slots)]
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        src_t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        src_p = torch.empty(size, dtype=torch.uint8)  # pageable

        def time_copies(fn) -> float:
            for _ in range(3):
                fn(0)
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for i in range(args.iters):
                fn(i)
            end.record(stream)
            end.synchronize()
            return size * args.iters / (start.elapsed_time(end) / 1e3) / 1e9

        def ring_copy(i):
            engine.copy(slots[i % len(slots)], dst, stream=stream)

        def torch_copy(i):
            with torch.cuda.stream(stream):
                dst.copy_(src_t, non_blocking=True)

        def pageable_copy(i):
            with torch.cuda.stream(stream):
                dst.copy_(src_p, non_blocking=True)

        klotski_gbps = time_copies(ring_copy)
        torch_gbps = time_copies(torch_copy)
        pageable_gbps = time_copies(pageable_copy)
        rows.append({"bytes": size, "klotski_ring_GBps": klotski_gbps, "torch_pinned_GBps": torch_gbps,
                     "torch_pageable_GBps": pageable_gbps, "ratio": klotski_gbps / torch_gbps,
                     "target_met": klotski_gbps >= 0.9 * torch_gbps})
        print(f"{size >> 20:>7} MiB {klotski_gbps:>14.2f} {torch_gbps:>14.2f} {klotski_gbps / torch_gbps:>7.0%} "
              f"{pageable_gbps:>10.2f}")
        torch.cuda.synchronize(device)
        if size == max(sizes):
            overlap = measure_overlap(torch, device, stream, lambda i: ring_copy(i), args.iters)
            print(f"overlap with bf16 matmuls ({size >> 20} MiB copies x {args.iters}): copies {overlap['copies_ms']:.2f} ms, "
                  f"matmuls {overlap['matmuls_ms']:.2f} ms, both {overlap['both_ms']:.2f} ms -> overlap "
                  f"{overlap['overlap']:.0%} (intervals overlap: {overlap['intervals_overlap']})")
        for s in slots:
            s.release()
    result = {"benchmark": "h2d", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "device": torch.cuda.get_device_name(device), "platform": platform.platform(),
              "slots": args.slots, "iters": args.iters, "rows": rows, "overlap": overlap}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
