"""Host-to-device copies out of ring slots, asynchronous, each with an event the compute stream can wait on.

    engine = CopyEngine("cuda:0")                       # or CopyEngine("cpu"): same interface, no GPU
    ev = engine.copy(slot, w13_gpu, src_offset=0, stream=copy_stream)   # torch.cuda.Stream, int or None
    ev.wait(compute_stream)                             # GPU-side wait; CPU mode: blocks until copied
    ...
    ev.synchronize(); slot.release()                    # releasing with the copy in flight raises

Destination tensors are validated here (device, contiguity, byte size) before their pointers reach C++.
In CPU mode the "device" is host memory: copies run in order on one native copy thread.
"""
from __future__ import annotations

import torch

from klotski import _C
from klotski.io.ring import Slot


def _stream_handle(stream, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise ValueError(f"stream must be a torch.cuda.Stream, an int handle or None, got {type(stream).__name__}")
    if getattr(stream, "device", device) != device:
        raise ValueError(f"stream is on {stream.device} but the copy engine targets {device}")
    return int(handle)


class CopyEvent:
    """Completion of one copy: ``done()``, ``synchronize(timeout)``, ``wait(stream)``."""

    def __init__(self, native: _C.CopyEvent, device: torch.device, keep):
        self._native = native
        self._device = device
        self._keep = keep  # source/destination stay alive while the event is referenced

    def done(self) -> bool:
        return self._native.done()

    def synchronize(self, timeout: float | None = None) -> None:
        self._native.synchronize(-1.0 if timeout is None else float(timeout))

    def wait(self, stream=None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copy on the GPU; CPU mode: block."""
        self._native.wait_on(_stream_handle(stream, self._device))


class CopyEngine:
    """Copies host bytes (a :class:`Slot` or a pinned host tensor) into tensors on ``device``."""

    def __init__(self, device: str | torch.device = "cpu"):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        self.device = device
        self._native = _C.CopyEngine(str(device))
        self._inflight: list[CopyEvent] = []

    def copy(self, src, dst: torch.Tensor, *, src_offset: int = 0, nbytes: int | None = None,
             stream=None) -> CopyEvent:
        """Copy ``nbytes`` (default: all of ``dst``) from ``src`` at ``src_offset`` into ``dst``.

        src: a live :class:`Slot` or a contiguous CPU tensor; dst: a contiguous tensor on this engine's device.
        """
        if not isinstance(dst, torch.Tensor):
            raise ValueError(f"dst must be a torch.Tensor, got {type(dst).__name__}")
        if dst.device != self.device:
            raise ValueError(f"dst is on {dst.device} but this copy engine targets {self.device}")
        if not dst.is_contiguous():
            raise ValueError(f"dst {tuple(dst.shape)} {dst.dtype} must be contiguous")
        dst_bytes = dst.numel() * dst.element_size()
        nbytes = dst_bytes if nbytes is None else int(nbytes)
        if nbytes < 0 or nbytes > dst_bytes:
            raise ValueError(f"nbytes {nbytes} does not fit dst {tuple(dst.shape)} {dst.dtype} ({dst_bytes} bytes)")
        if src_offset < 0:
            raise ValueError(f"src_offset must be >= 0, got {src_offset}")
        handle = _stream_handle(stream, self.device)
        if isinstance(src, (Slot, _C.Slot)):
            native_slot = src.native if isinstance(src, Slot) else src
            if src_offset + nbytes > native_slot.capacity:
                raise ValueError(f"copy of [{src_offset}, {src_offset + nbytes}) exceeds slot {native_slot.index} "
                                 f"({native_slot.capacity} bytes)")
            native = self._native.copy_from_slot(native_slot, src_offset, dst.data_ptr(), nbytes, handle)
        elif isinstance(src, torch.Tensor):
            if src.device.type != "cpu" or not src.is_contiguous():
                raise ValueError(f"src tensor must be a contiguous CPU tensor, got {src.device}, "
                                 f"contiguous={src.is_contiguous()}")
            src_bytes = src.numel() * src.element_size()
            if src_offset + nbytes > src_bytes:
                raise ValueError(f"copy of [{src_offset}, {src_offset + nbytes}) exceeds src ({src_bytes} bytes)")
            native = self._native.copy(src.data_ptr() + src_offset, dst.data_ptr(), nbytes, handle)
        else:
            raise ValueError(f"src must be a Slot or a CPU torch.Tensor, got {type(src).__name__}")
        event = CopyEvent(native, self.device, (src, dst))
        self._inflight = [e for e in self._inflight if not e.done()]
        self._inflight.append(event)
        return event

    def close(self) -> None:
        """CPU mode: finish queued copies and stop the copy thread."""
        self._native.close()
        self._inflight.clear()

    @property
    def is_cuda(self) -> bool:
        return self._native.is_cuda
