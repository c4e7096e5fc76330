"""Pinned ring buffer: N fixed-size, page-aligned host slots, acquired and released explicitly.

    ring = PinnedRing(num_slots=4, slot_bytes=64 << 20)      # pinned: "cuda" | "mlock" | "none"
    slot = ring.acquire(timeout=5.0)                          # RingExhaustedError after 5 s if all are taken
    ticket = reader.read(path, offset, nbytes, into=slot)     # disk -> slot
    w13 = slot.tensor(torch.bfloat16, (2 * I, H), offset=ticket.view_offset)
    ...
    slot.release()                                            # SlotStateError if a read/copy is in flight

A released :class:`Slot` is dead: every later use through the handle (address, view, numpy, tensor, read,
copy, a second release) raises :class:`SlotStateError`, and a slot with a read or copy still in flight
refuses to release. Memoryviews handed out by :meth:`Slot.view` are released with the slot (touching them
afterwards raises ValueError). numpy arrays and torch tensors over the slot (:meth:`Slot.numpy`,
:meth:`Slot.tensor`) keep no buffer export, so they are plain views: drop them before releasing.
"""
from __future__ import annotations

import numpy as np

from klotski import _C


class Slot:
    """One acquired slot: ``index``, ``nbytes`` (usable), ``capacity`` (rounded to pages), ``address``."""

    def __init__(self, native: _C.Slot, ring: "PinnedRing"):
        self._native = native
        self._ring = ring
        self._views: list[memoryview] = []

    @property
    def native(self) -> _C.Slot:
        return self._native

    @property
    def index(self) -> int:
        return self._native.index

    @property
    def nbytes(self) -> int:
        return self._native.nbytes

    @property
    def capacity(self) -> int:
        return self._native.capacity

    @property
    def live(self) -> bool:
        return self._native.live

    @property
    def address(self) -> int:
        return self._native.address

    def view(self) -> memoryview:
        """A writable uint8 memoryview of the whole slot (``capacity`` bytes), invalidated by release."""
        self._native.address  # SlotStateError if released (the buffer protocol would only say BufferError)
        mv = memoryview(self._native)
        self._views.append(mv)
        return mv

    def numpy(self, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """uint8 array over [offset, offset + nbytes) of the slot (valid until release)."""
        nbytes = self.capacity - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside slot {self.index} "
                             f"({self.capacity} bytes)")
        return np.frombuffer(self.view(), dtype=np.uint8, count=nbytes, offset=offset)

    def tensor(self, dtype, shape, offset: int = 0):
        """A torch tensor of ``dtype`` and ``shape`` over the slot's bytes from ``offset`` (no copy)."""
        import torch

        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"tensor {tuple(shape)} {dtype} ({nbytes} bytes at offset {offset}) does not fit "
                             f"slot {self.index} ({self.capacity} bytes)")
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        flat = torch.frombuffer(self.view(), dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).view(tuple(shape))

    def release(self) -> None:
        """Return the slot to its ring. Raises SlotStateError on double release, with reads or copies in
        flight; memoryviews from :meth:`view` are released with it."""
        self._native.release()
        for mv in self._views:
            try:
                mv.release()
            except BufferError:  # a consumer still holds an export of this memoryview: leave it be
                pass
        self._views.clear()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        if self._native.live:
            self.release()

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, nbytes={self.nbytes}, live={self.live})"


class PinnedRing:
    """``num_slots`` slots of ``slot_bytes`` each. ``pin``: "auto" (CUDA, else mlock, else plain), "cuda"
    (required; CudaError without it), "mlock" (best effort) or "none". ``pinned`` reports what happened."""

    def __init__(self, num_slots: int, slot_bytes: int, pin: str = "auto"):
        if int(num_slots) < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if int(slot_bytes) < 1:
            raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        self._native = _C.PinnedRing(int(num_slots), int(slot_bytes), pin)

    def acquire(self, timeout: float | None = 30.0) -> Slot:
        """A free slot, waiting up to ``timeout`` seconds (None: forever); then RingExhaustedError."""
        return Slot(self._native.acquire(-1.0 if timeout is None else float(timeout)), self)

    def try_acquire(self) -> Slot:
        """A free slot now, or RingExhaustedError at once."""
        return Slot(self._native.try_acquire(), self)

    num_slots = property(lambda self: self._native.num_slots)
    slot_bytes = property(lambda self: self._native.slot_bytes)
    slot_capacity = property(lambda self: self._native.slot_capacity)
    available = property(lambda self: self._native.available)
    pinned = property(lambda self: self._native.pinned)

    def __repr__(self) -> str:
        return (f"PinnedRing(num_slots={self.num_slots}, slot_bytes={self.slot_bytes}, pinned={self.pinned!r}, "
                f"available={self.available})")
