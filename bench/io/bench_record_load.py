"""Disk-resident expert loads, the runtime's way: today's torch path against one native call per record, and
the read engines (read on the lane's thread / thread pool / io_uring) against each other, paired in one run.

    python bench/io/bench_record_load.py --dir /work --shapes demo,qwen3-30b-a3b,deepseek-v2-lite \
        --out bench/results/record_load_cpu.json

Each variant is :class:`klotski.runtime.disk_loads.DiskLoads` (what ``PlacedWeights`` uses) loading packed
expert records (w13 [2I, H] + w2 [H, I], bf16, 4096-aligned as in a packed store) one after another, as one
loader lane does, into the slots of an expert pool on the "device" (CPU mode: host memory, fp32 as the
CPU runtime computes, or bf16 with ``--dst-dtype bfloat16``; ``--device cuda``: a bf16 pool on the GPU, the
ring pinned with cudaHostRegister, the copies on the current stream and waited for before the slot is released,
as on a loader lane):

- ``torch/sync``: today's path: ``read_now`` into a ring slot, then ``Tensor.copy_`` of w13 and w2 (Python
  between the read and each copy);
- ``native/<engine>``: one ``klotski._C.load_record`` call per record: the read (``sync``: on the calling
  thread; ``threads`` / ``uring``: through that DiskReader engine, the record split into ``--chunk`` pieces
  read in parallel) and the copies (widening bf16 -> fp32 in C++), no Python in between.

Cold reads: the file is opened with O_DIRECT (io mode AUTO; the table says which mode each file got) and, in
addition, dropped from the page cache (fsync + posix_fadvise DONTNEED) before every run. Every run reads its
own records (none re-read within a repetition, so a cache below the guest cannot favour a variant) and the
variants' order rotates per repetition. ``--overhead`` adds the same loads on page-cached data (io mode
POSIX, the file warm): the per-record cost of each path without the disk. GB/s = 1e9 bytes/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
import torch

from klotski.runtime.disk_loads import DiskLoads
from klotski.runtime.weights import Counters
from klotski.store.manifest import ExpertRecord, PackedTensor

SHAPES = {"demo": (256, 224), "qwen3-30b-a3b": (2048, 768), "olmoe-1b-7b": (2048, 1024),
          "deepseek-v2-lite": (2048, 1408)}  # (hidden, moe_intermediate)
VARIANTS = ("torch/sync", "native/sync", "native/threads", "native/uring")
ALIGN = 4096


def record_bytes(hidden: int, inter: int) -> int:
    return 3 * hidden * inter * 2  # bf16 w13 + w2


def make_records(path: str, hidden: int, inter: int, count: int) -> list[ExpertRecord]:
    """``count`` packed bf16 records of random values at 4096-aligned offsets of ``path`` (written once)."""
    n13, n2 = 2 * inter * hidden * 2, hidden * inter * 2
    stride = -(-(n13 + n2) // ALIGN) * ALIGN
    if not (os.path.exists(path) and os.path.getsize(path) == stride * count):
        rng = np.random.default_rng(0)
        # finite bf16 values (the top half of random fp32 normals); 8 distinct bodies written in turn (the disk
        # does not compress, and generating every record's own values would take longer than reading them)
        bodies = [(rng.standard_normal((n13 + n2) // 2, dtype=np.float32).view(np.uint32) >> 16)
                  .astype(np.uint16).tobytes().ljust(stride, b"\0") for _ in range(min(8, count))]
        with open(path + ".tmp", "wb") as f:
            for e in range(count):
                f.write(bodies[e % len(bodies)])
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
    return [ExpertRecord(0, e, path, e * stride, n13 + n2,
                         PackedTensor("w13", 0, n13, torch.bfloat16, (2 * inter, hidden), ""),
                         PackedTensor("w2", n13, n2, torch.bfloat16, (hidden, inter), ""))
            for e in range(count)]


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(variant: str, records: list[ExpertRecord], pool, args, cold: bool) -> dict:
    """Load ``records`` one by one into the pool's slots (round robin). -> GB/s, µs and CPU µs per record."""
    load_path, engine = variant.split("/")
    counters = Counters()
    slot_bytes = max(r.nbytes for r in records) + ALIGN
    loads = DiskLoads(torch.device(args.device), slot_bytes, 2, counters, path=load_path, engine=engine,
                      num_threads=args.threads)
    loads._verified.update((r.layer, r.expert) for r in records)  # the runtime checks a record once: not timed
    cuda = args.device.startswith("cuda")
    copy = lambda dst, src: dst.copy_(src.view(dst.shape), non_blocking=cuda)  # noqa: E731 - PlacedWeights.copy
    w13, w2 = pool
    try:
        if cold:
            drop_cache(records[0].path)
        mode = loads.reader.file_mode(records[0].path)
        c0, t0 = time.process_time(), time.perf_counter()
        for i, rec in enumerate(records):
            s = i % w13.shape[0]
            loads.read_record(copy, rec, w13[s], w2[s])
        if cuda:
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        loads.close()
    want = "native_loads" if load_path == "native" else "torch_loads"
    assert counters.get(want) == len(records), (variant, counters.values)  # the path measured is the one named
    n = sum(r.nbytes for r in records)
    return {"GBps": n / dt / 1e9, "us_per_record": dt / len(records) * 1e6,
            "cpu_us_per_record": cpu / len(records) * 1e6, "mode": mode}


def check_equal(records, pool, dst_dtype, device: str) -> None:
    """Every variant writes the same values (the torch reference) into the pool."""
    ref = None
    for variant in VARIANTS:
        pool[0].zero_(), pool[1].zero_()
        loads = DiskLoads(torch.device(device), max(r.nbytes for r in records) + ALIGN, 2, Counters(),
                          path=variant.split("/")[0], engine=variant.split("/")[1])
        loads._verified.update((r.layer, r.expert) for r in records[:1])
        loads.read_record(lambda d, s: d.copy_(s.view(d.shape)), records[0], pool[0][0], pool[1][0])
        if pool[0].is_cuda:
            torch.cuda.synchronize()
        loads.close()
        got = (pool[0][0].clone(), pool[1][0].clone())
        if ref is None:
            ref = got
        elif not (torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])):
            raise AssertionError(f"{variant} loaded other values than torch/sync into {dst_dtype} slots")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/work", help="where the record files are written (a real disk, not tmpfs)")
    p.add_argument("--shapes", default="demo,qwen3-30b-a3b,deepseek-v2-lite", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--bytes-per-run", type=float, default=128, help="MiB of records each run loads")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=8, help="threads (queue depth for uring) of the queued engines")
    p.add_argument("--device", default="cpu", help="cpu (the CPU runtime: pool in host memory) or cuda")
    p.add_argument("--dst-dtype", default=None, choices=["float32", "bfloat16"],
                   help="the pool's dtype (default: float32 on cpu, as the CPU runtime computes; bfloat16 on cuda)")
    p.add_argument("--slots", type=int, default=4, help="pool slots the records rotate through")
    p.add_argument("--overhead", action="store_true", help="also run on page-cached data (POSIX, warm file)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for the run (1: torch's copy_ never waits on a descheduled pool "
                        "thread of a busy machine; 0: torch's default)")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--label", default="")
    p.add_argument("--out", default="bench/results/record_load_cpu.json")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    args.dst_dtype = args.dst_dtype or ("float32" if args.device == "cpu" else "bfloat16")
    dst_dtype = getattr(torch, args.dst_dtype)
    rows, files = [], []
    try:
        for shape in args.shapes.split(","):
            hidden, inter = SHAPES[shape]
            nbytes = record_bytes(hidden, inter)
            per_run = max(4, int(args.bytes_per_run * (1 << 20)) // nbytes)
            count = per_run * len(variants) * args.repeat
            path = os.path.join(args.dir, f"klotski_bench_records_{shape}.bin")
            files.append(path)
            print(f"{shape}: {count} records of {nbytes / 2**20:.2f} MiB in {path}", flush=True)
            records = make_records(path, hidden, inter, count)
            pool = (torch.empty(args.slots, 2 * inter, hidden, dtype=dst_dtype, device=args.device),
                    torch.empty(args.slots, hidden, inter, dtype=dst_dtype, device=args.device))
            check_equal(records, pool, dst_dtype, args.device)
            order = list(range(count))
            random.Random(1).shuffle(order)
            for kind in ["cold"] + (["cached"] if args.overhead else []):
                samples: dict[str, list[dict]] = {v: [] for v in variants}
                os.environ["KLOTSKI_IO_MODE"] = "AUTO" if kind == "cold" else "POSIX"
                for rep in range(args.repeat):
                    vs = variants[rep % len(variants):] + variants[:rep % len(variants)]
                    for i, v in enumerate(vs):
                        k = (rep * len(variants) + i) * per_run
                        mine = [records[j] for j in order[k:k + per_run]] if kind == "cold" else records[:per_run]
                        samples[v].append(run(v, mine, pool, args, cold=kind == "cold"))
                row = {"shape": shape, "record_bytes": nbytes, "records_per_run": per_run, "kind": kind,
                       "dst_dtype": args.dst_dtype}
                for v, runs in samples.items():
                    for key in ("GBps", "us_per_record", "cpu_us_per_record"):
                        row[f"{v} {key}"] = statistics.median(r[key] for r in runs)
                    row[f"{v} GBps runs"] = [round(r["GBps"], 3) for r in runs]
                    row[f"{v} mode"] = sorted({r["mode"] for r in runs})
                if not rows:
                    print_header(variants)
                rows.append(row)
                print_row(row, variants)
    finally:
        os.environ.pop("KLOTSKI_IO_MODE", None)
        for f in files if not args.keep_files else ():
            if os.path.exists(f):
                os.remove(f)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "label": args.label,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}, "variants": variants,
              "threads": args.threads, "torch_threads": torch.get_num_threads(), "repeat": args.repeat, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


def print_header(variants: list[str]) -> None:
    print("| shape | record | data | " + " | ".join(f"{v} GB/s (µs/rec, CPU µs/rec)" for v in variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))


def print_row(row: dict, variants: list[str]) -> None:
    cells = [f"{row[f'{v} GBps']:.2f} ({row[f'{v} us_per_record']:.0f}, {row[f'{v} cpu_us_per_record']:.0f})"
             for v in variants]
    mode = "/".join(row[f"{variants[-1]} mode"])
    print(f"| {row['shape']} | {row['record_bytes'] / 2**20:.2f} MiB | {row['kind']} {mode} | " + " | ".join(cells)
          + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
