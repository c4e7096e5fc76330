"""Disk -> host read throughput of klotski's DiskReader, per engine (thread pool / io_uring), io mode, request
size and queue depth, side by side with fio (O_DIRECT, libaio, same block size and iodepth) and safetensors
``safe_open``.

    python bench/io/bench_disk_read.py --file /work/bench_io.safetensors --size-gib 4 \
        --out bench/results/disk_read_cpu.json

The benchmark file is a valid safetensors file (one U8 tensor "data", header padded so the data starts at
4096), so every reader loads the same bytes. Reads are random (each request-sized block at most once per
run) over the whole data region; the file is dropped from the page cache (fsync + posix_fadvise DONTNEED)
before every run, so POSIX (buffered) numbers are cold reads too. GB/s = 1e9 bytes/s.

fio comes from Debian: ``apt-get update && apt-get install -y fio``; without it the fio columns are skipped.
The file is deleted at the end unless --keep-file. ``--fresh-offsets`` gives every run its own random blocks (fio
its own ``--randseed``) and rotates the order per repetition: on a virtual disk with a cache below the guest's
page cache, re-reading the blocks of the previous run (as fio's default fixed sequence does) is faster.

``--fio-psync`` adds fio's psync engine and ``--c-pread`` a C loop of O_DIRECT preads (pread_loop.c) at QD 1:
the ``sync`` engine's path with nothing around it.

Engines (``--engines``): ``threads`` (``--threads`` native threads of blocking pread), ``uring`` (one thread
driving an io_uring, at most ``--uring-depth`` reads in flight), ``threadsN`` (the thread pool with N threads),
``sync`` (``DiskReader.read_now``: the pread runs on the calling thread, no engine; QD 1 only, skipped at other
depths).
Columns are keyed ``klotski_<MODE>_<engine>_GBps``; ``cpu_us_per_request_<MODE>_<engine>`` is the process's CPU
time (caller and engine threads) per request, less noisy than GB/s on a shared disk. ``--overhead`` adds per-request round trips on page-cached
data (QD 1), which isolates the engines' own cost from the disk.
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
import tempfile
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


def parse_engine(spec: str, threads: int, uring_depth: int) -> dict:
    """'threads' | 'uring' | 'threadsN' | 'sync' -> DiskReader keyword arguments (+ read_now=True for sync)."""
    if spec == "sync":
        return {"engine": "threads", "num_threads": 1, "read_now": True}
    if spec == "uring":
        return {"engine": "uring", "queue_depth": uring_depth}
    if spec.startswith("threads"):
        return {"engine": "threads", "num_threads": int(spec[len("threads"):] or threads)}
    raise ValueError(f"engine must be threads, threadsN, uring or sync, got {spec!r}")


def run_klotski(path, mode, size, depth, offsets, engine_kw, chunk) -> tuple[float, float]:
    """(GB/s, CPU microseconds of this process per request: caller + engine threads)."""
    ring = PinnedRing(depth, size)
    engine_kw = dict(engine_kw)
    sync = engine_kw.pop("read_now", False)
    if sync and depth != 1:
        raise ValueError(f"the sync engine (read_now) is QD 1 only, got QD {depth}")
    drop_cache(path)
    with DiskReader(mode=mode, chunk_bytes=chunk, **engine_kw) as reader:
        inflight: deque = deque()
        c0, t0 = time.process_time(), time.perf_counter()
        for off in offsets if sync else ():
            slot = ring.acquire(timeout=60)
            reader.read_now(path, off, size, into=slot)
            slot.release()
        for off in () if sync else offsets:
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
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(offsets) * size / elapsed / 1e9, cpu / len(offsets) * 1e6


def overhead_us(path, engine_kw, nbytes, n=2000) -> float:
    """Median-of-5 microseconds per read+wait of nbytes of page-cached data (POSIX mode, QD 1)."""
    from klotski import _C

    buf = _C.AlignedHostBuffer(max(4096, nbytes))
    times = []
    engine_kw = dict(engine_kw)
    sync = engine_kw.pop("read_now", False)
    with DiskReader(mode="POSIX", **engine_kw) as reader:
        reader.read(path, DATA_START, nbytes, into=buf).wait()  # opens the file, warms the cache
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                if sync:
                    reader.read_now(path, DATA_START, nbytes, into=buf)
                else:
                    reader.read(path, DATA_START, nbytes, into=buf).wait()
            times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def run_fio(path, data_bytes, size, depth, total, seed=None, engine="libaio") -> float | None:
    """fio's GB/s; seed None: fio's fixed random sequence (--randrepeat=1, the same blocks every run), else
    blocks drawn from this seed. engine "psync": one blocking pread at a time (QD 1), as read_now does."""
    drop_cache(path)
    rand = ["--randrepeat=1"] if seed is None else ["--randrepeat=0", f"--randseed={seed}"]
    cmd = ["fio", "--name=klotski", f"--filename={path}", "--rw=randread", f"--bs={size}", f"--iodepth={depth}",
           f"--ioengine={engine}", "--direct=1", f"--offset={DATA_START}", f"--size={data_bytes // size * size}",
           f"--io_size={min(total, data_bytes // size * size)}", *rand, "--invalidate=1",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"fio failed ({' '.join(cmd)}): {out.stderr.strip()}", file=sys.stderr)
        return None
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["read"]["bw_bytes"] / 1e9


def build_pread_loop() -> str:
    """Compile pread_loop.c (beside this script) with the system C compiler; -> path of the executable."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit("--c-pread needs a C compiler (cc / gcc)")
    exe = os.path.join(tempfile.mkdtemp(prefix="klotski_bench_"), "pread_loop")
    subprocess.run([cc, "-O2", "-o", exe, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pread_loop.c")],
                   check=True)
    return exe


def run_pread_loop(exe, path, data_bytes, size, total, seed) -> float:
    """GB/s of the C reference: random distinct blocks, O_DIRECT, one blocking pread at a time."""
    drop_cache(path)
    out = subprocess.run([exe, path, str(DATA_START), str(data_bytes), str(size), str(total), str(seed)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


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
    p.add_argument("--engines", default="threads,uring", help="threads, uring, threadsN (N threads), sync (QD 1)")
    p.add_argument("--threads", type=int, default=16, help="DiskReader threads of the 'threads' engine")
    p.add_argument("--uring-depth", type=int, default=32, help="DiskReader queue_depth of the 'uring' engine")
    p.add_argument("--overhead", action="store_true", help="also time cached QD-1 round trips per engine")
    p.add_argument("--chunk", default="4M", help="DiskReader chunk_bytes (large requests split into pieces)")
    p.add_argument("--fresh-offsets", action="store_true",
                   help="every run (each engine x mode, and fio with its own --randseed) reads its own random blocks "
                        "and the order rotates per repetition; default: the readers of a repetition share one block "
                        "list in a fixed order and fio re-reads its fixed sequence (--randrepeat=1) every time")
    p.add_argument("--fio-psync", action="store_true",
                   help="at QD 1 also run fio --ioengine=psync (blocking pread, the read_now path) beside libaio")
    p.add_argument("--c-pread", action="store_true",
                   help="at QD 1 also run pread_loop.c (compiled here): O_DIRECT pread in a C loop, nothing around it")
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--no-safetensors", action="store_true")
    p.add_argument("--keep-file", action="store_true")
    p.add_argument("--label", default="", help="free text stored with the results (machine, disk)")
    p.add_argument("--out", default="bench/results/disk_read.json")
    args = p.parse_args(argv)

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    modes = [m.strip().upper() for m in args.modes.split(",")]
    engines = {e.strip(): parse_engine(e.strip(), args.threads, args.uring_depth) for e in args.engines.split(",")}
    total = parse_size(args.bytes_per_run)
    pread_exe = build_pread_loop() if args.c_pread else None
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
                    seed = size * 31 + depth * 7 + rep
                    offsets = offsets_for(data_bytes, size, total, seed=seed)
                    row["bytes"] = len(offsets) * size
                    runs = [(mode, name, kw) for mode in modes for name, kw in engines.items()
                            if depth == 1 or not kw.get("read_now")]
                    runs += [("fio", None, None)] if have_fio else []
                    runs += [("fio", "psync", None)] if have_fio and args.fio_psync and depth == 1 else []
                    runs += [("c", "pread", None)] if pread_exe and depth == 1 else []
                    if args.fresh_offsets:  # rotate the order: no reader always runs right after the same one
                        k = rep % len(runs)
                        runs = runs[k:] + runs[:k]
                    for i, (mode, name, kw) in enumerate(runs):
                        # fresh: every run reads its own random blocks (fio: its own seed), so none re-reads
                        # blocks another run just read (a disk or host cache below the page cache would favour it)
                        run_seed = seed * 1009 + i + 1 if args.fresh_offsets else None
                        if mode == "c":
                            samples.setdefault("c_pread_direct_GBps", []).append(run_pread_loop(
                                pread_exe, args.file, data_bytes, size, total, seed if run_seed is None else run_seed))
                            continue
                        if mode == "fio":
                            key = "fio_direct_GBps" if name is None else f"fio_{name}_direct_GBps"
                            samples.setdefault(key, []).append(
                                run_fio(args.file, data_bytes, size, depth, total, run_seed, name or "libaio"))
                            continue
                        mine = offsets if run_seed is None else offsets_for(data_bytes, size, total, seed=run_seed)
                        gbps, cpu_us = run_klotski(args.file, mode, size, depth, mine, kw, parse_size(args.chunk))
                        samples.setdefault(f"klotski_{mode}_{name}_GBps", []).append(gbps)
                        samples.setdefault(f"cpu_us_per_request_{mode}_{name}", []).append(cpu_us)
                    if not args.no_safetensors and depth == 1:
                        few = offsets[: max(1, parse_size(args.safetensors_bytes) // size)]
                        samples.setdefault("safetensors_GBps", []).append(run_safetensors(args.file, size, few))
                for key, vals in samples.items():
                    vals = [v for v in vals if v is not None]
                    row[key] = statistics.median(vals) if vals else None
                row["samples"] = samples
                for name in engines:
                    if row.get("fio_direct_GBps") and f"klotski_DIRECT_{name}_GBps" in row:
                        row[f"DIRECT_{name}_vs_fio"] = row[f"klotski_DIRECT_{name}_GBps"] / row["fio_direct_GBps"]
                        # per repetition (the disk drifts between runs: the run beside it is the fairer yardstick)
                        ours, fio = samples[f"klotski_DIRECT_{name}_GBps"], samples["fio_direct_GBps"]
                        pairs = [a / b for a, b in zip(ours, fio) if b]
                        row[f"DIRECT_{name}_vs_fio_paired"] = statistics.median(pairs) if pairs else None
                    if samples.get("c_pread_direct_GBps") and f"klotski_DIRECT_{name}_GBps" in row:
                        pairs = zip(samples[f"klotski_DIRECT_{name}_GBps"], samples["c_pread_direct_GBps"])
                        row[f"DIRECT_{name}_vs_c_pread_paired"] = statistics.median(a / b for a, b in pairs)
                rows.append(row)
                print_row(row, modes, list(engines), have_fio, first=len(rows) == 1)
        overhead = []
        if args.overhead:
            print(f"{'engine':>10} {'bytes':>9} {'us/read (cached, QD 1)':>24}")
            for name, kw in engines.items():
                for nbytes in (0, 4096, 256 << 10):
                    us = overhead_us(args.file, kw, nbytes, n=2000 if nbytes < (256 << 10) else 500)
                    overhead.append({"engine": name, "bytes": nbytes, "us_per_read": us})
                    print(f"{name:>10} {nbytes:>9} {us:>24.1f}", flush=True)
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
        "engines": engines, "uring_depth": args.uring_depth,
        "repeat": args.repeat, "bytes_per_run": total, "fresh_offsets": args.fresh_offsets,
        "access": "random request-sized blocks, each at most once per run; page cache dropped before each run; "
                  "each cell is the median of `repeat` runs, readers interleaved",
        "rows": rows,
        "overhead_cached_qd1": overhead,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def print_row(row, modes, engines, have_fio, first):
    keys = [(f"{m} {e}", f"klotski_{m}_{e}_GBps") for m in modes for e in engines]
    if have_fio:
        keys += [("fio direct", "fio_direct_GBps"), ("fio psync", "fio_psync_direct_GBps"),
                 ("C pread", "c_pread_direct_GBps")]
        keys += [(f"DIRECT {e}/fio", f"DIRECT_{e}_vs_fio") for e in engines]
    keys.append(("safe_open", "safetensors_GBps"))
    keys += [(f"cpu us/req {e}", f"cpu_us_per_request_{modes[0]}_{e}") for e in engines]
    if first:
        print(f"{'request':>9} {'QD':>3} " + " ".join(f"{c:>16}" for c, _ in keys)
              + f"   (GB/s; CPU us per request in {modes[0]} mode)")
    cells = []
    for _, key in keys:
        v = row.get(key)
        if v is None:
            cells.append(f"{'-':>16}")
        elif key.endswith("_vs_fio"):
            cells.append(f"{v:>15.0%} ")
        else:
            cells.append(f"{v:>16.0f}" if key.startswith("cpu_") else f"{v:>16.2f}")
    print(f"{human(row['request_bytes']):>9} {row['queue_depth']:>3} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
