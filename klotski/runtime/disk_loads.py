"""Disk-resident weights into device tensors: one native call per record, or the torch path.

A packed-store expert record (w13 + w2, and an int4 store's scales and zero points) or one streamed
checkpoint tensor is loaded by :func:`klotski.io.load_record`: read into a slot of the staging ring, copied
into its device tensors by the :class:`~klotski.io.CopyEngine` (CUDA: on the loader lane's stream, one event,
waited before the slot is released; CPU mode: on the lane's thread, widening bf16 / fp16 to fp32 when the
pool is fp32), with no Python between the read and the copies. The torch path (read into the slot, then
``Tensor.copy_`` per tensor) remains for what the native copy does not do: fp8 block-scaled weights (their
scales are read beside them and dequantized on the device), and dtype pairs other than "as stored" and
bf16 / fp16 -> fp32 on the host.

Options (``path=`` / ``$KLOTSKI_LOAD_PATH``: "native" or "torch"; ``engine=`` / ``$KLOTSKI_LOAD_ENGINE``:
"sync" reads on the lane's own thread, "threads" / "uring" through a :class:`~klotski.io.DiskReader` engine
that splits a record into ``chunk_bytes`` pieces read in parallel). The defaults are the measured faster
ones: ``bench/io/bench_record_load.py``, results in ``bench/results/record_load_cpu.md``.
Counters: ``native_loads`` / ``torch_loads`` count the records and tensors each path loaded (tests check
the runtime took the path it should), ``disk_read`` / ``h2d`` the bytes.
"""
from __future__ import annotations

import os
import threading
import time

import torch

from klotski.io import CopyEngine, DiskReader, PinnedRing, convert_code, load_record
from klotski.quant.int4 import Int4Weight

PATHS = ("native", "torch")
ENGINES = ("sync", "threads", "uring")
ENV_PATH, ENV_ENGINE = "KLOTSKI_LOAD_PATH", "KLOTSKI_LOAD_ENGINE"
DEFAULT_PATH, DEFAULT_ENGINE = "native", "threads"  # measured: bench/results/record_load_cpu.md
RING_TIMEOUT_S = 120.0


def resolve_load_options(path: str | None = None, engine: str | None = None) -> tuple[str, str]:
    """(path, engine): the arguments if given, else the environment, else the measured defaults."""
    out = []
    for value, env, allowed, default in ((path, ENV_PATH, PATHS, DEFAULT_PATH),
                                         (engine, ENV_ENGINE, ENGINES, DEFAULT_ENGINE)):
        source = "argument"
        if value is None:
            value, source = os.environ.get(env) or default, env
        v = str(value).strip().lower()
        if v not in allowed:
            raise ValueError(f"load {'path' if env == ENV_PATH else 'engine'} ({source}) must be one of "
                             f"{', '.join(allowed)}, got {value!r}")
        out.append(v)
    return out[0], out[1]


def _record_targets(rec, w13, w2):
    """[(PackedTensor, device tensor)] a record's bytes go to, or None when the native copy cannot do it
    (fp8 records: their scales are dequantized on the device)."""
    if rec.block is not None:
        return None
    if isinstance(w13, Int4Weight):
        pairs = [(rec.w13, w13.qweight), (rec.w13_scale, w13.scales), (rec.w2, w2.qweight), (rec.w2_scale, w2.scales)]
        if rec.w13_zeros is not None:
            pairs += [(rec.w13_zeros, w13.zeros), (rec.w2_zeros, w2.zeros)]
        return pairs
    return [(rec.w13, w13), (rec.w2, w2)]


class DiskLoads:
    """The staging ring, the reader and the copy engine of one runtime; loads run on the loader lanes."""

    def __init__(self, device: torch.device, slot_bytes: int, ring_slots: int, counters, store=None,
                 scale_reader=None, path: str | None = None, engine: str | None = None, num_threads: int = 8):
        self.device, self.counters, self.store = device, counters, store
        self.cuda = device.type == "cuda"
        self.path, self.engine = resolve_load_options(path, engine)
        self.scale_reader = scale_reader  # (info) -> fp32 scales of an fp8 piece (the checkpoint index)
        self.ring = PinnedRing(ring_slots, slot_bytes, pin="auto" if self.cuda else "none")
        if self.engine == "sync":  # reads run on the lanes (read_now): the reader only holds the open files
            self.reader = DiskReader(num_threads=1, engine="threads")
        else:
            self.reader = DiskReader(num_threads=num_threads, engine=self.engine, queue_depth=max(num_threads, 1))
        self.copier = CopyEngine(device) if self.path == "native" else None
        self._templates: dict[tuple[str, int], list | None] = {}  # record -> [(src offset, bytes, code, target #)]
        self._verified: set[tuple[int, int]] = set()
        self._local = threading.local()  # per loader thread: seconds spent waiting on disk reads

    # ---- timing ----------------------------------------------------------------------------------------
    def _add_read_seconds(self, s: float) -> None:
        self._local.read_s = getattr(self._local, "read_s", 0.0) + s

    def take_read_seconds(self) -> float:
        """Seconds this thread waited on disk reads since the last call (the read part of a traced load;
        the rest of the load is the copy into the device buffer)."""
        s, self._local.read_s = getattr(self._local, "read_s", 0.0), 0.0
        return s

    # ---- one native call -------------------------------------------------------------------------------
    def _native(self, path: str, offset: int, nbytes: int, slot, parts: list[tuple]) -> None:
        stream = torch.cuda.current_stream(self.device) if self.cuda else None  # the lane's stream on a lane
        _, read_s = load_record(self.reader, self.copier, path, offset, nbytes, slot, parts, stream=stream,
                                queued=self.engine != "sync", synchronize=True, timeout=RING_TIMEOUT_S)
        self._add_read_seconds(read_s)
        self.counters.add("native_loads", 1)

    def _read(self, path: str, offset: int, nbytes: int, slot):
        t0 = time.perf_counter()
        if self.engine == "sync":  # the lane waits for each read anyway: read_now saves the hand-over
            ticket = self.reader.read_now(path, offset, nbytes, into=slot)
        else:
            ticket = self.reader.read(path, offset, nbytes, into=slot).wait(RING_TIMEOUT_S)
        self._add_read_seconds(time.perf_counter() - t0)
        return ticket

    def _sync_device(self) -> None:
        """CUDA: the copies out of the slot are done (the slot is released next)."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
            done.synchronize()

    # ---- records of the packed store ---------------------------------------------------------------------
    def _template(self, rec, w13, w2):
        key = (rec.path, rec.offset)
        if key not in self._templates:
            targets = None if self.copier is None else _record_targets(rec, w13, w2)
            codes = None if targets is None else [convert_code(p.dtype, t.dtype, t.device) for p, t in targets]
            if codes is None or None in codes or not all(t.is_contiguous() for _, t in targets) or any(
                    p.nbytes * (2 if c else 1) != t.numel() * t.element_size() for (p, t), c in zip(targets, codes)):
                self._templates[key] = None
            else:
                self._templates[key] = [(p.offset, p.nbytes, c) for (p, _), c in zip(targets, codes)]
        return self._templates[key]

    def read_record(self, copy, rec, w13, w2, to_device: bool = True) -> int:
        """One packed-store expert record (one read) into device ``w13`` / ``w2`` (tensors or int4 slot
        views); ``copy(dst, src)`` is the torch path's host -> device copy. Checksums are checked the first
        time a record is read (ChecksumError names the tensor). ``to_device=False``: into host tensors for the
        CPU to compute from (the torch path; no bytes cross the link). -> bytes read."""
        template = self._template(rec, w13, w2) if to_device else None
        slot = self.ring.acquire(timeout=RING_TIMEOUT_S)
        try:
            view_offset = rec.offset % 4096
            if template is not None:
                targets = [t for _, t in _record_targets(rec, w13, w2)]
                parts = [(o, t.data_ptr(), n, c) for (o, n, c), t in zip(template, targets)]
                self._native(rec.path, rec.offset, rec.nbytes, slot, parts)
            else:
                view_offset = self._read(rec.path, rec.offset, rec.nbytes, slot).view_offset
            if (rec.layer, rec.expert) not in self._verified:
                raw = slot.tensor(torch.uint8, (rec.nbytes,), offset=view_offset)
                self.store.verify_record(rec, raw)
                del raw
                self._verified.add((rec.layer, rec.expert))
            if template is None:
                # Fp8Weight views for fp8 stores (ExpertStore.views)
                src13, src2 = rec.views(slot.tensor(torch.uint8, (rec.nbytes,), offset=view_offset))
                copy(w13, src13)
                copy(w2, src2)
                self._sync_device()
                del src13, src2
                self.counters.add("torch_loads", 1)
        finally:
            slot.release()
        self.counters.add("disk_read", rec.nbytes)
        if to_device:
            self.counters.add("h2d", rec.nbytes)
        return rec.nbytes

    # ---- streamed checkpoint tensors ---------------------------------------------------------------------
    def read_piece(self, copy, info, dst: torch.Tensor, to_device: bool = True) -> None:
        """One checkpoint tensor (``TensorInfo``; fp8: with its block scales) into device rows ``dst``
        (``to_device=False``: host rows, through the torch path; no bytes cross the link)."""
        code = convert_code(info.dtype, dst.dtype, dst.device) if self.copier is not None and to_device else None
        native = (code is not None and info.scale_inv is None and dst.is_contiguous()
                  and info.nbytes * (2 if code else 1) == dst.numel() * dst.element_size())
        slot = self.ring.acquire(timeout=RING_TIMEOUT_S)
        try:
            if native:
                self._native(info.path, info.offset, info.nbytes, slot, [(0, dst.data_ptr(), info.nbytes, code)])
            else:
                ticket = self._read(info.path, info.offset, info.nbytes, slot)
                src = slot.tensor(info.dtype, info.shape, offset=ticket.view_offset)
                if info.scale_inv is not None:  # its block scales: a small read beside the weight
                    t0 = time.perf_counter()
                    src = self.scale_reader(info, src)
                    self._add_read_seconds(time.perf_counter() - t0)
                copy(dst, src)
                self._sync_device()
                del src
                self.counters.add("torch_loads", 1)
        finally:
            slot.release()
        self.counters.add("disk_read", info.stored_nbytes)
        if to_device:
            self.counters.add("h2d", info.stored_nbytes)

    def close(self) -> None:
        if self.copier is not None:
            self.copier.close()
        self.reader.close()
