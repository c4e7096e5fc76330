"""Host-to-device copy throughput: klotski ring slots (cudaHostRegister'd, copied by klotski._C on a side
stream) vs torch's own pinned-memory copy (``torch.empty(pin_memory=True)`` + ``copy_(non_blocking=True)``),
per copy size. Needs CUDA; without it the script says so and exits with status 2.

    python bench/io/bench_h2d.py --sizes 1M,16M,64M,256M --slots 4 --out bench/results/h2d_<gpu>.json

Each cell: ``--iters`` copies of one size back to back on one stream, timed with CUDA events after a warm-up;
GB/s = 1e9 bytes/s. The ring copies cycle through all slots (as the runtime streams experts).
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
    rows = []
    print(f"{'size':>10} {'klotski ring':>14} {'torch pinned':>14} {'ratio':>7}   (GB/s, {torch.cuda.get_device_name(device)})")
    for size in sizes:
        ring = PinnedRing(args.slots, size, pin="cuda")
        slots = [ring.acquire() for _ in range(args.slots)]
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        src_t = torch.empty(size, dtype=torch.uint8, pin_memory=True)

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

        klotski_gbps = time_copies(ring_copy)
        torch_gbps = time_copies(torch_copy)
        rows.append({"bytes": size, "klotski_ring_GBps": klotski_gbps, "torch_pinned_GBps": torch_gbps,
                     "ratio": klotski_gbps / torch_gbps})
        print(f"{size >> 20:>7} MiB {klotski_gbps:>14.2f} {torch_gbps:>14.2f} {klotski_gbps / torch_gbps:>7.0%}")
        torch.cuda.synchronize(device)
        for s in slots:
            s.release()
    result = {"benchmark": "h2d", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "device": torch.cuda.get_device_name(device), "platform": platform.platform(),
              "slots": args.slots, "iters": args.iters, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
