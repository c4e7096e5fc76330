"""GPUDirect Storage (cuFile, dlopen'd): disk -> GPU memory without a host bounce, where the platform has it.

    if gds_available():
        with GdsFile(rec.path) as f:
            f.read_into(w13_w2_gpu_bytes, rec.offset)   # blocking; the GIL is released

Everywhere else ``gds_available()`` is False (``gds_unavailable_reason()`` says why) and the runtime reads
into a pinned ring slot and copies with :class:`klotski.io.CopyEngine` instead.
"""
from __future__ import annotations

import os

import torch

from klotski import _C

gds_available = _C.gds_available
gds_unavailable_reason = _C.gds_unavailable_reason


class GdsFile:
    """A file registered with cuFile. :meth:`read_into` fills a contiguous CUDA tensor from ``offset``."""

    def __init__(self, path: str | os.PathLike):
        self._native = _C.GdsFile(os.fspath(path))  # CudaError when GDS is unavailable

    def read_into(self, dst: torch.Tensor, offset: int, nbytes: int | None = None) -> None:
        if not isinstance(dst, torch.Tensor) or dst.device.type != "cuda":
            raise ValueError(f"GDS destination must be a CUDA tensor, got {getattr(dst, 'device', type(dst))}")
        if not dst.is_contiguous():
            raise ValueError("GDS destination tensor must be contiguous")
        dst_bytes = dst.numel() * dst.element_size()
        nbytes = dst_bytes if nbytes is None else int(nbytes)
        if not 0 <= nbytes <= dst_bytes:
            raise ValueError(f"nbytes {nbytes} does not fit the destination ({dst_bytes} bytes)")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._native.read(dst.data_ptr(), nbytes, int(offset), 0)

    def close(self) -> None:
        self._native = None

    def __enter__(self) -> "GdsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
