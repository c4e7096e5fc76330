import os
import random

import numpy as np
import pytest

from io_files import python_read
from klotski import _C
from klotski.io import (DiskReader, IOMode, PinnedRing, ReaderClosedError, ShortReadError, io_uring_info,
                        resolve_engine, resolve_io_mode, span_bytes)

MODES = ["AUTO", "DIRECT", "POSIX"]
URING = io_uring_info()
needs_uring = pytest.mark.skipif(not URING["available"], reason=f"io_uring unavailable: {URING['reason']}")
ENGINES = ["threads", pytest.param("uring", marks=needs_uring)]


def make_reader(engine, mode="AUTO", threads=8, **kw):
    """A reader on `engine`; `threads` bounds the reads in flight for either engine."""
    reader = DiskReader(mode=mode, engine=engine, num_threads=threads, queue_depth=threads, **kw)
    assert reader.engine == engine
    return reader


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_random_reads_equal_python_reads(files, mode, engine):
    rng = random.Random(sum(map(ord, mode + engine)))
    ring = PinnedRing(4, 1 << 20)
    with make_reader(engine, mode, threads=4, chunk_bytes=64 << 10) as reader:
        for _ in range(60):
            path = rng.choice(files)
            size = os.path.getsize(path)
            max_n = min(size, (1 << 20) - 4096)
            nbytes = rng.choice([0, 1, 511, min(4096, max_n), rng.randrange(1, max_n + 1)])
            offset = rng.randrange(0, size - nbytes + 1)
            slot = ring.acquire(timeout=5)
            t = reader.read(path, offset, nbytes, into=slot).wait(timeout=10)
            if mode != "POSIX":
                assert t.mode == "DIRECT"  # ext4/tmpfs (>= 6.6) take O_DIRECT
            assert t.view_offset == offset % 4096
            got = slot.numpy(t.view_offset, nbytes).tobytes()
            assert got == python_read(path, offset, nbytes), (path, offset, nbytes)
            slot.release()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_reads_into_aligned_buffers_numpy_and_torch(files, mode, engine):
    import torch

    path, offset, nbytes = files[0], 5000, 300_001
    with make_reader(engine, mode) as reader:
        buf = _C.AlignedHostBuffer(span_bytes(offset, nbytes))
        t = reader.read(path, offset, nbytes, into=buf).wait()
        assert bytes(memoryview(buf)[t.view_offset:t.view_offset + nbytes]) == python_read(path, offset, nbytes)
        tensor = torch.zeros(span_bytes(offset, nbytes) // 4 + 1024, dtype=torch.float32)  # 64-B aligned at best
        if mode == "DIRECT" and tensor.data_ptr() % 4096:
            with pytest.raises(ValueError, match="DIRECT mode needs a 4096-aligned destination"):
                reader.read(path, offset, nbytes, into=tensor)
        else:
            t = reader.read(path, offset, nbytes, into=tensor).wait()
            raw = tensor.view(torch.uint8).numpy()[t.view_offset:t.view_offset + nbytes].tobytes()
            assert raw == python_read(path, offset, nbytes)
            if mode == "AUTO" and tensor.data_ptr() % 4096:
                assert t.mode == "POSIX"  # unaligned destination: buffered for this request
        assert reader.read_bytes(path, 7, 9) == python_read(path, 7, 9)


@pytest.mark.parametrize("engine", ENGINES)
def test_many_concurrent_requests_across_files(files, engine):
    rng = random.Random(1)
    with make_reader(engine, "AUTO", threads=8, chunk_bytes=16 << 10) as reader:
        jobs = []
        for _ in range(300):
            path = rng.choice(files)
            size = os.path.getsize(path)
            nbytes = rng.randrange(1, min(size, 200_000))
            offset = rng.randrange(0, size - nbytes + 1)
            buf = _C.AlignedHostBuffer(span_bytes(offset, nbytes))
            jobs.append((reader.read(path, offset, nbytes, into=buf), buf, path, offset, nbytes))
        for t, buf, path, offset, nbytes in jobs:
            t.wait(timeout=30)
            assert bytes(memoryview(buf)[t.view_offset:t.view_offset + nbytes]) == python_read(path, offset, nbytes)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_missing_file_names_path_offset_and_size(tmp_path, mode, engine):
    missing = str(tmp_path / "nope.bin")
    buf = _C.AlignedHostBuffer(8192)
    with make_reader(engine, mode) as reader:
        with pytest.raises(FileNotFoundError, match=r"nope\.bin' at offset 12, 34 bytes") as info:
            reader.read(missing, 12, 34, into=buf)
        assert info.value.filename == missing


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_read_past_eof_and_truncated_file_raise_short_read(tmp_path, mode, engine):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10_000)
    buf = _C.AlignedHostBuffer(1 << 20)
    with make_reader(engine, mode, chunk_bytes=4096) as reader:
        t = reader.read(str(path), 9_000, 2_000, into=buf)  # crosses EOF
        with pytest.raises(ShortReadError, match=r"short\.bin' at offset 9000, 2000 bytes.*file is 10000 bytes"):
            t.wait(timeout=10)
        t = reader.read(str(path), 50_000, 10, into=buf)  # starts past EOF
        with pytest.raises(OSError, match="short read"):
            t.wait(timeout=10)
        t = reader.read(str(path), 0, 10_000, into=buf).wait(timeout=10)  # exactly to EOF is fine
        assert bytes(memoryview(buf)[:10_000]) == b"x" * 10_000
    with make_reader(engine, mode) as reader:
        path.write_bytes(b"y" * 100_000)
        first = reader.read(str(path), 0, 100_000, into=buf)
        first.wait(timeout=10)
        os.truncate(path, 30_000)  # the file shrinks under an open reader
        with pytest.raises(ShortReadError, match="file is 30000 bytes"):
            reader.read(str(path), 20_000, 50_000, into=buf).wait(timeout=10)


@pytest.mark.parametrize("engine", ENGINES)
def test_os_error_from_pread_is_an_oserror_naming_the_request(tmp_path, engine):
    with make_reader(engine, "POSIX") as reader:
        t = reader.read(str(tmp_path), 0, 10, into=_C.AlignedHostBuffer(4096))  # a directory: EISDIR
        with pytest.raises(IsADirectoryError, match="at offset 0, 10 bytes"):
            t.wait(timeout=10)


@pytest.mark.parametrize("engine", ENGINES)
def test_closed_reader_raises_and_cancel_never_hangs(files, engine):
    reader = make_reader(engine, "AUTO", threads=1, chunk_bytes=4096)
    buf = _C.AlignedHostBuffer(span_bytes(0, 3 << 20))
    tickets = [reader.read(files[0], 0, 3 << 20, into=buf) for _ in range(20)]  # 768 pieces each
    reader.close(cancel=True)
    outcomes = set()
    for t in tickets:
        assert t.done()  # close returns only after running pieces finished and queued ones were dropped
        try:
            t.wait(timeout=1)
            outcomes.add("done")
        except ReaderClosedError as e:
            assert "cancelled" in str(e) and "f0.bin" in str(e)
            outcomes.add("cancelled")
    assert "cancelled" in outcomes
    with pytest.raises(ReaderClosedError, match="reader is closed"):
        reader.read(files[0], 0, 10, into=buf)
    reader.close()  # idempotent


@pytest.mark.parametrize("engine", ENGINES)
def test_close_drains_queued_reads(files, engine):
    reader = make_reader(engine, "AUTO", threads=2, chunk_bytes=64 << 10)
    bufs = [_C.AlignedHostBuffer(span_bytes(0, 1 << 20)) for _ in range(8)]
    tickets = [reader.read(files[0], 0, 1 << 20, into=b) for b in bufs]
    reader.close()
    expect = python_read(files[0], 0, 1 << 20)
    for t, b in zip(tickets, bufs):
        t.wait(timeout=1)
        assert bytes(memoryview(b)[: 1 << 20]) == expect


def test_bad_arguments_are_value_errors(files):
    with DiskReader() as reader:
        with pytest.raises(ValueError, match="destination holds 4096 bytes but needs 5000"):
            reader.read(files[0], 0, 5000, into=_C.AlignedHostBuffer(4096))
        with pytest.raises(ValueError, match=">= 0"):
            reader.read(files[0], -1, 10, into=_C.AlignedHostBuffer(4096))
        with pytest.raises(ValueError, match="read-only"):
            reader.read(files[0], 0, 10, into=b"\0" * 8192)
    with pytest.raises(ValueError, match="chunk_bytes"):
        DiskReader(chunk_bytes=1000)


def test_io_mode_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv("KLOTSKI_IO_MODE", raising=False)
    assert resolve_io_mode() is IOMode.AUTO
    monkeypatch.setenv("KLOTSKI_IO_MODE", "posix")
    assert resolve_io_mode() is IOMode.POSIX
    assert DiskReader().mode is IOMode.POSIX
    assert resolve_io_mode("direct") is IOMode.DIRECT  # the argument wins
    monkeypatch.setenv("KLOTSKI_IO_MODE", "fast")
    with pytest.raises(ValueError, match="KLOTSKI_IO_MODE.*'fast'"):
        DiskReader()


def test_posix_mode_opens_files_buffered(files):
    with DiskReader(mode="POSIX") as reader:
        assert reader.file_mode(files[0]) == "POSIX"
    with DiskReader(mode="AUTO") as reader:
        assert reader.file_mode(files[0]) == "DIRECT"


def test_engine_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv("KLOTSKI_IO_ENGINE", raising=False)
    assert resolve_engine() == "auto"
    auto = DiskReader()
    assert auto.engine in ("uring", "threads") and auto.engine_note.startswith("auto") and "io_uring" in auto.engine_note
    if not URING["available"]:
        assert auto.engine == "threads"
    auto.close()
    monkeypatch.setenv("KLOTSKI_IO_ENGINE", "Threads")
    assert resolve_engine() == "threads"
    with DiskReader() as reader:
        assert reader.engine == "threads" and reader.num_threads == 8
    assert resolve_engine("URING") == "uring"  # the argument wins
    monkeypatch.setenv("KLOTSKI_IO_ENGINE", "spdk")
    with pytest.raises(ValueError, match="KLOTSKI_IO_ENGINE.*auto, uring or threads.*'spdk'"):
        DiskReader()
    with pytest.raises(ValueError, match=r"io engine \(argument\) must be auto, uring or threads, got 'aio'"):
        DiskReader(engine="aio")
    with pytest.raises(ValueError, match="io engine must be auto, uring or threads"):
        _C.DiskReader("AUTO", 2, 4096, "aio")
    with pytest.raises(ValueError, match="queue_depth"):
        DiskReader(engine="threads", queue_depth=0)


@needs_uring
def test_uring_engine_reports_itself_and_keeps_a_bounded_queue(files):
    expect = python_read(files[0], 17, 3 << 20)  # ends exactly at end of file
    with DiskReader(engine="uring", queue_depth=2, chunk_bytes=4096) as reader:
        assert (reader.engine, reader.num_threads, reader.queue_depth) == ("uring", 1, 2)
        assert "uring" in repr(reader)
        bufs = [_C.AlignedHostBuffer(span_bytes(17, 3 << 20)) for _ in range(4)]
        tickets = [reader.read(files[0], 17, 3 << 20, into=b) for b in bufs]  # 769 pieces each, 2 in flight
        for t, b in zip(tickets, bufs):
            t.wait(timeout=30)
            assert t.mode == "DIRECT"
            assert bytes(memoryview(b)[t.view_offset:t.view_offset + (3 << 20)]) == expect


def test_uring_engine_unavailable_is_a_clear_error_not_a_fallback():
    if URING["available"]:
        pytest.skip("io_uring works here; tests/csrc/test_native_io.py checks the refusal under seccomp")
    with pytest.raises(RuntimeError, match="io_uring unavailable"):
        DiskReader(engine="uring")
