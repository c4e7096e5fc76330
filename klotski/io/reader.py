"""Disk reader: (path, offset, nbytes) reads on native threads or an io_uring, into a ring slot or aligned
host memory.

    with DiskReader(mode="AUTO", engine="auto") as reader:  # or KLOTSKI_IO_MODE / KLOTSKI_IO_ENGINE
        t = reader.read(path, offset, nbytes, into=slot)    # returns at once; the GIL is free meanwhile
        t.wait(timeout=10)                                  # raises the read's error, naming path/offset/size
        data = slot.numpy(t.view_offset, nbytes)
        t = reader.read_now(path, offset, nbytes, into=slot)  # the same read on this thread, done on return

Modes (kvikio's compat mode, decided once per file): DIRECT opens with O_DIRECT (page cache bypassed) and
fails where that is refused; POSIX reads buffered; AUTO tries O_DIRECT per file and falls back to buffered
reads for files (or unaligned destinations) that cannot take it. In every mode the requested bytes land at
``into + view_offset`` with ``view_offset = offset % 4096``; a direct read fills the aligned superset, so
its destination must be 4096-aligned and hold ``span_bytes(offset, nbytes)`` bytes (slots always are).

Engines (``engine=`` or ``KLOTSKI_IO_ENGINE``): "threads" runs blocking pread()s on ``num_threads`` native
threads; "uring" has one native thread submit reads to an io_uring (raw syscalls, no liburing) with at most
``queue_depth`` pieces in flight and reap them; "auto" takes the one measured faster (bench/results/
disk_read_cpu.md: so far the thread pool, io_uring was not faster in GB/s) and would fall back to threads where
the kernel refuses io_uring (old kernel, seccomp, ``kernel.io_uring_disabled``; ``engine="uring"`` raises
there). ``reader.engine`` says which one runs, ``reader.engine_note`` why.
Both engines give the same results, tickets and errors.

``read_now`` skips the engine: the calling thread does the pread itself (GIL released), for queue-depth-1
callers that would wait at once anyway; it saves the hand-over to an engine thread and the wake-up back.

Closing drains queued reads (``close()``) or cancels them (``close(cancel=True)``: their tickets raise
ReaderClosedError); reads already running finish either way, so no destination is written after close.
"""
from __future__ import annotations

import enum
import os
from collections import deque

import numpy as np

from klotski import _C
from klotski.io.ring import Slot

DIRECT_ALIGNMENT = _C.DIRECT_ALIGNMENT
ENV_IO_MODE = "KLOTSKI_IO_MODE"
ENV_IO_ENGINE = "KLOTSKI_IO_ENGINE"
ENGINES = ("auto", "uring", "threads")


class IOMode(str, enum.Enum):
    AUTO = "AUTO"
    DIRECT = "DIRECT"
    POSIX = "POSIX"


def resolve_io_mode(mode: str | IOMode | None = None) -> IOMode:
    """The io mode to use: ``mode`` if given, else ``$KLOTSKI_IO_MODE``, else AUTO (case-insensitive)."""
    source = "argument"
    if mode is None:
        mode, source = os.environ.get(ENV_IO_MODE, "AUTO"), ENV_IO_MODE
    value = mode.value if isinstance(mode, IOMode) else str(mode).strip().upper()
    try:
        return IOMode(value)
    except ValueError:
        raise ValueError(f"io mode ({source}) must be AUTO, DIRECT or POSIX, got {mode!r}") from None


def resolve_engine(engine: str | None = None) -> str:
    """The engine to ask for: ``engine`` if given, else ``$KLOTSKI_IO_ENGINE``, else "auto" (case-insensitive)."""
    source = "argument"
    if engine is None:
        engine, source = os.environ.get(ENV_IO_ENGINE, "auto"), ENV_IO_ENGINE
    value = str(engine).strip().lower()
    if value not in ENGINES:
        raise ValueError(f"io engine ({source}) must be auto, uring or threads, got {engine!r}")
    return value


def io_uring_info() -> dict:
    """{'available': bool, 'reason': str}: whether this kernel lets the reader use io_uring, and why not."""
    return dict(_C.io_uring_info())


def host_span(into) -> tuple[int, int]:
    """(address, nbytes) of a writable, C-contiguous host buffer: a torch CPU tensor, a numpy array,
    an ``_C.AlignedHostBuffer`` or anything with the writable buffer protocol."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(into, torch.Tensor):
        if into.device.type != "cpu":
            raise ValueError(f"read destination must be host memory, got a tensor on {into.device}")
        if not into.is_contiguous():
            raise ValueError("read destination tensor must be contiguous")
        return into.data_ptr(), into.numel() * into.element_size()
    arr = into if isinstance(into, np.ndarray) else np.frombuffer(into, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("read destination array must be C-contiguous")
    if not arr.flags.writeable:
        raise ValueError(f"read destination {type(into).__name__} is read-only")
    return arr.ctypes.data, arr.nbytes


class ReadTicket:
    """One queued read. ``done()`` polls, ``wait(timeout)`` blocks and raises the read's error if any."""

    def __init__(self, native: _C.ReadTicket, into):
        self._native = native
        self._into = into  # keeps the destination alive for as long as the ticket is referenced

    def done(self) -> bool:
        return self._native.done()

    def wait(self, timeout: float | None = None) -> "ReadTicket":
        """Block until the read finished (TimeoutError after ``timeout`` s); re-raise its error."""
        self._native.wait(-1.0 if timeout is None else float(timeout))
        return self

    path = property(lambda self: self._native.path)
    offset = property(lambda self: self._native.offset)
    nbytes = property(lambda self: self._native.nbytes)
    view_offset = property(lambda self: self._native.view_offset)
    mode = property(lambda self: self._native.mode)  # "DIRECT" or "POSIX": how it was actually read
    native = property(lambda self: self._native)

    def __repr__(self) -> str:
        return f"ReadTicket({self.path!r}, offset={self.offset}, nbytes={self.nbytes}, mode={self.mode})"


class DiskReader:
    """Reads on an engine ("threads": ``num_threads`` native threads; "uring": one thread, at most
    ``queue_depth`` reads in flight); requests larger than ``chunk_bytes`` run as parallel pieces.
    ``engine="uring"`` raises RuntimeError where the kernel refuses io_uring; "auto" falls back to threads."""

    def __init__(self, mode: str | IOMode | None = None, num_threads: int = 8, chunk_bytes: int = 4 << 20,
                 engine: str | None = None, queue_depth: int = 32):
        self.mode = resolve_io_mode(mode)
        engine = resolve_engine(engine)
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if not 1 <= int(queue_depth) <= 4096:
            raise ValueError(f"queue_depth must be in 1..4096, got {queue_depth}")
        if int(chunk_bytes) <= 0 or int(chunk_bytes) % DIRECT_ALIGNMENT:
            raise ValueError(f"chunk_bytes must be a positive multiple of {DIRECT_ALIGNMENT}, got {chunk_bytes}")
        self._native = _C.DiskReader(self.mode.value, int(num_threads), int(chunk_bytes), engine, int(queue_depth))
        self._inflight: deque[ReadTicket] = deque()  # destinations of unfinished reads stay alive here
        self._prune_at = 64

    def read(self, path: str | os.PathLike, offset: int, nbytes: int, into) -> ReadTicket:
        """Queue a read of ``nbytes`` at ``offset`` of ``path`` into ``into`` (a :class:`Slot` or a writable
        host buffer). A missing file raises here; read errors raise from :meth:`ReadTicket.wait`."""
        ticket = ReadTicket(self._call(self._native.read, self._native.read_into_slot, path, offset, nbytes, into),
                            into)
        self._forget_finished()
        self._inflight.append(ticket)
        return ticket

    def read_now(self, path: str | os.PathLike, offset: int, nbytes: int, into) -> ReadTicket:
        """The same read done on the calling thread (a blocking pread loop, GIL released) before returning:
        no engine thread, no hand-over and wake-up, for callers that would wait on the ticket at once anyway
        (a queue-depth-1 reader). Same modes, layout (``into + view_offset``) and open-file cache as
        :meth:`read`; safe to call from several threads at once. Returns the ticket, already finished;
        the read's errors raise here (FileNotFoundError, ShortReadError, OSError naming path, offset and
        size; ReaderClosedError after :meth:`close`)."""
        return ReadTicket(self._call(self._native.read_now, self._native.read_now_into_slot, path, offset, nbytes,
                                     into), into)

    @staticmethod
    def _call(to_buffer, to_slot, path, offset: int, nbytes: int, into) -> _C.ReadTicket:
        """Validate the request and hand it to ``to_slot`` (slots) or ``to_buffer`` (host memory)."""
        path = os.fspath(path)
        offset, nbytes = int(offset), int(nbytes)
        if offset < 0 or nbytes < 0:
            raise ValueError(f"read of {path!r}: offset and nbytes must be >= 0, got {offset}, {nbytes}")
        if isinstance(into, Slot):
            return to_slot(path, offset, nbytes, into.native)
        if isinstance(into, _C.Slot):
            return to_slot(path, offset, nbytes, into)
        address, capacity = host_span(into)
        return to_buffer(path, offset, nbytes, address, capacity)

    def _forget_finished(self) -> None:
        """Drop finished tickets: the oldest ones each time, all of them when the queue grew long (amortised
        O(1) per read instead of polling every ticket in flight)."""
        inflight = self._inflight
        while inflight and inflight[0].done():
            inflight.popleft()
        if len(inflight) > self._prune_at:
            self._inflight = deque(t for t in inflight if not t.done())
            self._prune_at = max(64, 2 * len(self._inflight))

    def read_bytes(self, path: str | os.PathLike, offset: int, nbytes: int, timeout: float | None = None) -> bytes:
        """Convenience: read into a fresh aligned buffer, wait, return the bytes."""
        buf = _C.AlignedHostBuffer(max(1, _C.span_bytes(int(offset), int(nbytes))), DIRECT_ALIGNMENT)
        t = self.read(path, offset, nbytes, into=buf).wait(timeout)
        return bytes(memoryview(buf)[t.view_offset : t.view_offset + int(nbytes)])

    def file_mode(self, path: str | os.PathLike) -> str:
        """How this reader reads ``path``: "DIRECT" or "POSIX" (opens it if needed)."""
        return self._native.file_mode(os.fspath(path))

    def forget(self, path: str | os.PathLike) -> None:
        """Drop the cached descriptors of ``path`` (after the file was replaced)."""
        self._native.forget(os.fspath(path))

    def close(self, cancel: bool = False) -> None:
        """Drain (or cancel) queued reads, wait for running :meth:`read_now` calls, stop the threads. Idempotent."""
        self._native.close(cancel)
        self._inflight.clear()

    @property
    def closed(self) -> bool:
        return self._native.closed

    num_threads = property(lambda self: self._native.num_threads)  # threads doing reads (1 for "uring")
    queue_depth = property(lambda self: self._native.queue_depth)  # reads in flight at most
    engine = property(lambda self: self._native.engine)  # "threads" or "uring": the engine in use
    engine_note = property(lambda self: self._native.engine_note)  # why (e.g. auto's fallback reason)
    chunk_bytes = property(lambda self: self._native.chunk_bytes)

    def __enter__(self) -> "DiskReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def __repr__(self) -> str:
        return (f"DiskReader(mode={self.mode.value}, engine={self.engine}, num_threads={self.num_threads}, "
                f"closed={self.closed})")
