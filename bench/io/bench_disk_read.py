"""Disk -> host read throughput of klotski's DiskReader, per io mode, request size and queue depth,
side by side with fio (O_DIRECT, libaio, same block size and iodepth) and safetensors ``safe_open``.

    python bench/io/bench_disk_read.py --file /work/bench_io.safetensors --size-gib 4 \
        --out bench/results/disk_read_cpu.json

The benchmark file is a valid safetensors file (one U8 tensor "data", header padded so the data starts at
4096), so every reader loads the same bytes. Reads are random (each request-sized block at most once per
run) over the whole data region; the file is dropped from the page cache (fsync + posix_fadvise DONTNEED)
before every run, so POSIX (buffered) numbers are cold reads too. GB/s = 1e9 bytes/s.

fio comes from Debian: ``apt-get update && apt-get install -y fio``; without it the fio columns are skipped.
The file is deleted at the end unless --keep-file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque

import numpy as np

from klotski.io import DiskReader, PinnedRing

DATA_START = 4096
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def make_file(path: str, data_bytes: int) -> None:
    """A safetensors file holding one U8 tensor 'data' of data_bytes random bytes, data at offset 4096."""
    header = json.dumps({"data": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}})
    header = header.encode().ljust(DATA_START - 8, b" ")
    rng = np.random.default_rng(0)
    chunk = 64 << 20
    with open(path + ".tmp", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left = data_bytes
        while left:
            n = min(chunk, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def offsets_for(data_bytes: int, size: int, total: int, seed: int) -> list[int]:
    blocks = data_bytes // size
    n = min(blocks, max(1, total // size))
    picked = random.Random(seed).sample(range(blocks), n)
    return [DATA_START + b * size for b in picked]


def run_klotski(path, mode, size, depth, offsets, threads, chunk) -> float:
    ring = PinnedRing(depth, size)
    drop_cache(path)
    with DiskReader(mode=mode, num_threads=threads, chunk_bytes=chunk) as reader:
        inflight: deque = deque()
        t0 = time.perf_counter()
        for off in offsets:
            if len(inflight) == depth:
                ticket, slot = inflight.popleft()
                ticket.wait()
                slot.release()
            slot = ring.acquire(timeout=60)
            inflight.append((reader.read(path, off, size, into=slot), slot))
        while inflight:
            ticket, slot = inflight.popleft()
            ticket.wait()
            slot.release()
        elapsed = time.perf_counter() - t0
    return len(offsets) * size / elapsed / 1e9


def run_fio(path, data_bytes, size, depth, total) -> float | None:
    drop_cache(path)
    cmd = ["fio", "--name=klotski", f"--filename={path}", "--rw=randread", f"--bs={size}", f"--iodepth={depth}",
           "--ioengine=libaio", "--direct=1", f"--offset={DATA_START}", f"--size={data_bytes // size * size}",
           f"--io_size={min(total, data_bytes // size * size)}", "--randrepeat=1", "--invalidate=1",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"fio failed ({' '.join(cmd)}): {out.stderr.strip()}", file=sys.stderr)
        return None
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["read"]["bw_bytes"] / 1e9


def run_safetensors(path, size, offsets) -> float:
    """safe_open + get_slice per request, copied into a host buffer (a slice is a lazy view of the mmap:
    without the copy no byte would be read)."""
    import torch
    from safetensors import safe_open

    out = torch.empty(size, dtype=torch.uint8)
    drop_cache(path)
    t0 = time.perf_counter()
    with safe_open(path, framework="pt") as f:
        data = f.get_slice("data")
        for off in offsets:
            a = off - DATA_START
            out.copy_(data[a:a + size])
    return len(offsets) * size / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default="/work/klotski_bench_io.safetensors")
    p.add_argument("--size-gib", type=float, default=4.0, help="data bytes of the benchmark file (GiB)")
    p.add_argument("--sizes", default="256K,1M,4M,16M,64M", help="request sizes")
    p.add_argument("--depths", default="1,2,4,8,16", help="queue depths (requests in flight)")
    p.add_argument("--modes", default="DIRECT,AUTO,POSIX")
    p.add_argument("--bytes-per-run", default="512M", help="bytes read per measurement")
    p.add_argument("--repeat", type=int, default=3,
                   help="measurements per cell, readers interleaved; the median is reported (shared disks are noisy)")
    p.add_argument("--safetensors-bytes", default="128M", help="bytes per safe_open measurement (it is slow)")
    p.add_argument("--threads", type=int, default=16, help="DiskReader threads")
    p.add_argument("--chunk", default="4M", help="DiskReader chunk_bytes (large requests split into pieces)")
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--no-safetensors", action="store_true")
    p.add_argument("--keep-file", action="store_true")
    p.add_argument("--label", default="", help="free text stored with the results (machine, disk)")
    p.add_argument("--out", default="bench/results/disk_read.json")
    args = p.parse_args(argv)

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    modes = [m.strip().upper() for m in args.modes.split(",")]
    total = parse_size(args.bytes_per_run)
    data_bytes = int(args.size_gib * (1 << 30)) // (64 << 20) * (64 << 20)
    have_fio = shutil.which("fio") is not None and not args.no_fio
    if not have_fio and not args.no_fio:
        print("fio not found: skipping the fio columns (install: apt-get update && apt-get install -y fio)")

    if not (os.path.exists(args.file) and os.path.getsize(args.file) == DATA_START + data_bytes):
        print(f"writing {human(data_bytes)} benchmark file {args.file} ...", flush=True)
        make_file(args.file, data_bytes)
    rows = []
    try:
        for size in sizes:
            for depth in depths:
                row = {"request_bytes": size, "queue_depth": depth}
                samples: dict[str, list[float]] = {}
                for rep in range(args.repeat):
                    offsets = offsets_for(data_bytes, size, total, seed=size * 31 + depth * 7 + rep)
                    row["bytes"] = len(offsets) * size
                    for mode in modes:
                        samples.setdefault(f"klotski_{mode}_GBps", []).append(
                            run_klotski(args.file, mode, size, depth, offsets, args.threads, parse_size(args.chunk)))
                    if have_fio:
                        samples.setdefault("fio_direct_GBps", []).append(
                            run_fio(args.file, data_bytes, size, depth, total))
                    if not args.no_safetensors and depth == 1:
                        few = offsets[: max(1, parse_size(args.safetensors_bytes) // size)]
                        samples.setdefault("safetensors_GBps", []).append(run_safetensors(args.file, size, few))
                for key, vals in samples.items():
                    vals = [v for v in vals if v is not None]
                    row[key] = statistics.median(vals) if vals else None
                row["samples"] = samples
                if row.get("fio_direct_GBps") and "klotski_DIRECT_GBps" in row:
                    row["DIRECT_vs_fio"] = row["klotski_DIRECT_GBps"] / row["fio_direct_GBps"]
                rows.append(row)
                print_row(row, modes, have_fio, first=len(rows) == 1)
    finally:
        if not args.keep_file:
            os.remove(args.file)

    result = {
        "benchmark": "disk_read",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "label": args.label,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "file_data_bytes": data_bytes, "threads": args.threads, "chunk_bytes": parse_size(args.chunk),
        "repeat": args.repeat, "bytes_per_run": total,
        "access": "random request-sized blocks, each at most once per run; page cache dropped before each run; "
                  "each cell is the median of `repeat` runs, readers interleaved",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def print_row(row, modes, have_fio, first):
    cols = [f"klotski {m}" for m in modes] + (["fio direct", "DIRECT/fio"] if have_fio else []) + ["safe_open"]
    if first:
        print(f"{'request':>9} {'QD':>3} " + " ".join(f"{c:>14}" for c in cols) + "   (GB/s)")
    vals = [row.get(f"klotski_{m}_GBps") for m in modes]
    if have_fio:
        vals += [row.get("fio_direct_GBps"), row.get("DIRECT_vs_fio")]
    vals.append(row.get("safetensors_GBps"))
    cells = []
    for i, v in enumerate(vals):
        is_ratio = have_fio and i == len(modes) + 1
        cells.append(f"{'-':>14}" if v is None else (f"{v:>13.0%} " if is_ratio else f"{v:>14.2f}"))
    print(f"{human(row['request_bytes']):>9} {row['queue_depth']:>3} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
