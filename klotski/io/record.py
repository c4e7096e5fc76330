"""One native call per disk-resident record: read it into a ring slot, copy its parts to the device.

    part = copy_part(src_offset=0, src_dtype=torch.bfloat16, src_nbytes=n, dst=pool_w13[slot])  # checked once
    event, read_s = load_record(reader, engine, path, offset, nbytes, slot, [part, ...], stream=lane_stream)
    slot.release()                     # with synchronize=True (default) the copies are done on return

The read runs on the calling thread (``queued=False``: one blocking pread loop, as ``DiskReader.read_now``)
or through the reader's engine (``queued=True``: thread pool / io_uring, the record split into parallel
pieces). The copies go through the :class:`~klotski.io.CopyEngine`: on CUDA one ``cudaMemcpyAsync`` per part
on ``stream`` (the loader lane's) and one event recorded after them; in CPU mode (the "device" is host
memory) each part is copied, or widened bf16 / fp16 -> fp32, on the calling thread. Nothing returns to
Python between the read and the copies, and nothing runs in Python per chunk.

A part is ``(src_offset, dst address, src_bytes, convert)``; :func:`copy_part` builds it from a destination
tensor after checking device, contiguity, size and dtype, so the runtime can check a (record, slot) pair
once and reuse the tuple. The destination tensors must outlive every call that uses their parts.
"""
from __future__ import annotations

import torch

from klotski import _C
from klotski.io.copy import CopyEngine, CopyEvent, _stream_handle
from klotski.io.reader import DiskReader
from klotski.io.ring import Slot

_WIDEN = {(torch.bfloat16, torch.float32): 1, (torch.float16, torch.float32): 2}


def convert_code(src_dtype: torch.dtype, dst_dtype: torch.dtype, device: torch.device) -> int | None:
    """0 (bytes as stored), 1 / 2 (bf16 / fp16 widened to fp32, host only), or None: no native copy."""
    if src_dtype == dst_dtype:
        return 0
    return _WIDEN.get((src_dtype, dst_dtype)) if device.type == "cpu" else None


def copy_part(src_offset: int, src_dtype: torch.dtype, src_nbytes: int, dst: torch.Tensor) -> tuple:
    """The native part copying ``src_nbytes`` record bytes of ``src_dtype`` at ``src_offset`` into ``dst``."""
    if not isinstance(dst, torch.Tensor) or not dst.is_contiguous():
        raise ValueError(f"record part at {src_offset}: destination must be a contiguous tensor, got "
                         f"{type(dst).__name__}{'' if not isinstance(dst, torch.Tensor) else ' (not contiguous)'}")
    code = convert_code(src_dtype, dst.dtype, dst.device)
    if code is None:
        raise ValueError(f"record part at {src_offset}: {src_dtype} -> {dst.dtype} on {dst.device} has no native "
                         f"copy (bytes as stored, or bf16/fp16 -> fp32 on the host)")
    want = src_nbytes * (2 if code else 1)
    have = dst.numel() * dst.element_size()
    if want != have:
        raise ValueError(f"record part at {src_offset}: {src_nbytes} bytes of {src_dtype} need a destination of "
                         f"{want} bytes as {dst.dtype}, got {tuple(dst.shape)} ({have} bytes)")
    return int(src_offset), dst.data_ptr(), int(src_nbytes), code


def load_record(reader: DiskReader, engine: CopyEngine, path: str, offset: int, nbytes: int, slot: Slot,
                parts: list[tuple], *, stream=None, queued: bool = False, synchronize: bool = True,
                timeout: float | None = None) -> tuple[CopyEvent, float]:
    """Read ``nbytes`` at ``offset`` of ``path`` into ``slot`` and copy ``parts`` (from :func:`copy_part`) out of
    it. -> (the copies' event, seconds the read took). Read errors raise here (FileNotFoundError,
    ShortReadError, ... naming path, offset and size); a part outside the record raises ValueError."""
    native_slot = slot.native if isinstance(slot, Slot) else slot
    handle = _stream_handle(stream, engine.device)
    ev, read_s = _C.load_record(reader._native, engine._native, str(path), int(offset), int(nbytes), native_slot,
                                parts, handle, bool(queued), bool(synchronize), -1.0 if timeout is None else timeout)
    return CopyEvent(ev, engine.device, (slot, parts)), read_s
