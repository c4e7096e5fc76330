"""Klotski's I/O path: a thin, validating Python layer over ``klotski._C``.

- :class:`PinnedRing` / :class:`Slot` (``ring``): N page-aligned host slots, pinned through CUDA when it can
  be loaded, else mlock'd; explicit acquire/release; misuse raises :class:`SlotStateError`.
- :class:`DiskReader` / :class:`ReadTicket` (``reader``): (path, offset, nbytes) reads on a native thread
  pool or an io_uring (``engine=`` / ``KLOTSKI_IO_ENGINE``) into a slot or an aligned host buffer, io mode
  AUTO / DIRECT / POSIX (argument or ``KLOTSKI_IO_MODE``); ``read_now`` does the same read on the calling thread
  (for queue-depth-1 callers).
- :class:`CopyEngine` / :class:`CopyEvent` (``copy``): asynchronous slot -> device copies on a caller's
  CUDA stream, or host -> host in CPU mode with the same interface.
- :func:`load_record` (``record``): one native call per disk-resident record: read into a ring slot, copy its
  parts to the device through a :class:`CopyEngine` on the loader lane's stream, one completion event.

Errors: ``OSError`` subclasses (FileNotFoundError, ...) and :class:`ShortReadError` for reads, naming path,
offset and size; ``TimeoutError`` / :class:`RingExhaustedError` for waits; :class:`ReaderClosedError` for a
closed reader or a cancelled read; ``ValueError`` for bad arguments.
"""
from klotski._C import (
    CudaError,
    ReaderClosedError,
    RingExhaustedError,
    ShortReadError,
    SlotStateError,
    cuda_available,
    cuda_info,
    span_bytes,
)
from klotski.io.copy import CopyEngine, CopyEvent
from klotski.io.reader import (DIRECT_ALIGNMENT, DiskReader, IOMode, ReadTicket, io_uring_info, resolve_engine,
                               resolve_io_mode)
from klotski.io.record import convert_code, copy_part, load_record
from klotski.io.ring import PinnedRing, Slot

__all__ = [
    "CopyEngine",
    "CopyEvent",
    "CudaError",
    "DIRECT_ALIGNMENT",
    "DiskReader",
    "IOMode",
    "PinnedRing",
    "ReadTicket",
    "ReaderClosedError",
    "RingExhaustedError",
    "ShortReadError",
    "Slot",
    "SlotStateError",
    "cuda_available",
    "convert_code",
    "copy_part",
    "cuda_info",
    "io_uring_info",
    "load_record",
    "resolve_engine",
    "resolve_io_mode",
    "span_bytes",
]
