"""DiskReader.read_now: the same read as DiskReader.read, done on the calling thread."""
import os
import random
import threading

import numpy as np
import pytest
import torch

from io_files import python_read
from klotski import _C
from klotski.io import DiskReader, PinnedRing, ReaderClosedError, ShortReadError, SlotStateError, span_bytes

MODES = ["AUTO", "DIRECT", "POSIX"]


def random_request(rng, files, max_bytes):
    path = rng.choice(files)
    size = os.path.getsize(path)
    max_n = min(size, max_bytes)
    nbytes = rng.choice([0, 1, 4095, min(4096, max_n), max_n, rng.randrange(1, max_n + 1)])
    return path, rng.randrange(0, size - nbytes + 1), nbytes


@pytest.mark.parametrize("mode", MODES)
def test_random_reads_equal_python_reads(files, mode):
    rng = random.Random(sum(map(ord, mode)))
    ring = PinnedRing(2, 1 << 20)
    with DiskReader(mode=mode, num_threads=1) as reader:
        for _ in range(80):
            path, offset, nbytes = random_request(rng, files, (1 << 20) - 4096)
            slot = ring.acquire(timeout=5)
            t = reader.read_now(path, offset, nbytes, into=slot)
            assert t.done() and t.wait(timeout=0) is t  # finished on return
            assert (t.path, t.offset, t.nbytes, t.view_offset) == (path, offset, nbytes, offset % 4096)
            assert t.mode == ("POSIX" if mode == "POSIX" else "DIRECT")  # ext4/tmpfs (>= 6.6) take O_DIRECT
            assert slot.numpy(t.view_offset, nbytes).tobytes() == python_read(path, offset, nbytes)
            slot.release()


@pytest.mark.parametrize("mode", MODES)
def test_same_layout_as_queued_reads_in_buffers_and_tensors(files, mode):
    path, offset, nbytes = files[0], 12_345, 1_500_000  # larger than chunk_bytes: one pread loop, not pieces
    expect = python_read(path, offset, nbytes)
    with DiskReader(mode=mode, chunk_bytes=64 << 10) as reader:
        a, b = (_C.AlignedHostBuffer(span_bytes(offset, nbytes)) for _ in range(2))
        now = reader.read_now(path, offset, nbytes, into=a)
        queued = reader.read(path, offset, nbytes, into=b).wait(timeout=10)
        assert (now.view_offset, now.mode) == (queued.view_offset, queued.mode)
        assert bytes(memoryview(a)[now.view_offset:now.view_offset + nbytes]) == expect
        assert bytes(memoryview(a)) == bytes(memoryview(b))  # superset bytes too, where DIRECT
        tensor = torch.zeros(span_bytes(offset, nbytes) + 4096, dtype=torch.uint8)
        if mode == "DIRECT" and tensor.data_ptr() % 4096:
            with pytest.raises(ValueError, match="DIRECT mode needs a 4096-aligned destination"):
                reader.read_now(path, offset, nbytes, into=tensor)
        else:
            t = reader.read_now(path, offset, nbytes, into=tensor)
            assert tensor.numpy()[t.view_offset:t.view_offset + nbytes].tobytes() == expect
            if mode == "AUTO" and tensor.data_ptr() % 4096:
                assert t.mode == "POSIX"  # unaligned destination: buffered for this request
        array = np.zeros(nbytes + 4096, dtype=np.uint8)  # numpy destination, any alignment, POSIX layout
        if mode != "DIRECT":
            t = reader.read_now(path, offset, nbytes, into=array)
            assert array[t.view_offset:t.view_offset + nbytes].tobytes() == expect


@pytest.mark.parametrize("mode", ["AUTO", "POSIX"])
def test_concurrent_read_now_from_several_threads(files, mode):
    """Eight threads share one reader (and its open-file cache, opened concurrently) with queued reads
    running beside them; every byte lands where it should."""
    errors, counts = [], []
    reader = DiskReader(mode=mode, num_threads=2, chunk_bytes=64 << 10)
    start = threading.Barrier(8)

    def worker(seed):
        rng = random.Random(seed)
        buf = _C.AlignedHostBuffer(span_bytes(4095, 300_000))
        n = 0
        try:
            start.wait(timeout=10)
            for i in range(40):
                path, offset, nbytes = random_request(rng, files, 300_000)
                if i % 5 == 4:
                    t = reader.read(path, offset, nbytes, into=buf).wait(timeout=30)
                else:
                    t = reader.read_now(path, offset, nbytes, into=buf)
                got = bytes(memoryview(buf)[t.view_offset:t.view_offset + nbytes])
                if got != python_read(path, offset, nbytes):
                    errors.append((path, offset, nbytes))
                n += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        counts.append(n)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    reader.close()
    assert not errors and counts == [40] * 8


@pytest.mark.parametrize("mode", MODES)
def test_missing_file_past_eof_and_truncated_file(tmp_path, mode):
    buf = _C.AlignedHostBuffer(1 << 20)
    missing = str(tmp_path / "nope.bin")
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10_000)
    with DiskReader(mode=mode) as reader:
        with pytest.raises(FileNotFoundError, match=r"nope\.bin' at offset 12, 34 bytes") as info:
            reader.read_now(missing, 12, 34, into=buf)
        assert info.value.filename == missing
        with pytest.raises(ShortReadError, match=r"short\.bin' at offset 9000, 2000 bytes.*file is 10000 bytes"):
            reader.read_now(str(path), 9_000, 2_000, into=buf)  # crosses EOF
        with pytest.raises(OSError, match=r"short read.*at offset 50000, 10 bytes"):
            reader.read_now(str(path), 50_000, 10, into=buf)  # starts past EOF
        t = reader.read_now(str(path), 0, 10_000, into=buf)  # exactly to EOF is fine
        assert bytes(memoryview(buf)[:10_000]) == b"x" * 10_000 and t.view_offset == 0
        path.write_bytes(b"y" * 100_000)
        reader.forget(str(path))
        reader.read_now(str(path), 0, 100_000, into=buf)
        os.truncate(path, 30_000)  # the file shrinks under an open reader
        with pytest.raises(ShortReadError, match=r"at offset 20000, 50000 bytes.*file is 30000 bytes"):
            reader.read_now(str(path), 20_000, 50_000, into=buf)


def test_os_error_names_the_request(tmp_path):
    with DiskReader(mode="POSIX") as reader:
        with pytest.raises(IsADirectoryError, match="at offset 0, 10 bytes"):
            reader.read_now(str(tmp_path), 0, 10, into=_C.AlignedHostBuffer(4096))  # a directory: EISDIR


def test_bad_destinations_are_value_errors(files):
    with DiskReader(mode="DIRECT") as reader:
        with pytest.raises(ValueError, match="destination holds 4096 bytes but needs 5000"):
            reader.read_now(files[0], 0, 5000, into=_C.AlignedHostBuffer(4096))
        aligned_5000 = np.frombuffer(_C.AlignedHostBuffer(8192), dtype=np.uint8)[:5000]
        with pytest.raises(ValueError, match=r"DIRECT mode needs a 4096-aligned destination of at least 8192 bytes"):
            reader.read_now(files[0], 100, 4000, into=aligned_5000)  # holds the bytes, not the aligned superset
        unaligned = np.frombuffer(_C.AlignedHostBuffer(3 * 4096), dtype=np.uint8)[8:]
        with pytest.raises(ValueError, match="DIRECT mode needs a 4096-aligned destination"):
            reader.read_now(files[0], 0, 4096, into=unaligned)
        with pytest.raises(ValueError, match=">= 0"):
            reader.read_now(files[0], -1, 10, into=_C.AlignedHostBuffer(4096))
        with pytest.raises(ValueError, match="read-only"):
            reader.read_now(files[0], 0, 10, into=b"\0" * 8192)
        with pytest.raises(ValueError, match="contiguous"):
            reader.read_now(files[0], 0, 10, into=torch.zeros(64, 64, dtype=torch.uint8).t())


def test_released_slot_is_refused(files):
    ring = PinnedRing(1, 8192)
    slot = ring.acquire(timeout=1)
    slot.release()
    with DiskReader() as reader:
        with pytest.raises(SlotStateError):
            reader.read_now(files[0], 0, 10, into=slot)


def test_closed_reader_raises_and_close_waits_for_running_reads(files):
    reader = DiskReader(mode="AUTO", num_threads=1)
    buf = _C.AlignedHostBuffer(4096)
    reader.read_now(files[0], 0, 10, into=buf)
    started, outcomes, lock = threading.Event(), [], threading.Lock()

    def worker():
        own = _C.AlignedHostBuffer(span_bytes(0, 1 << 20))
        expect = python_read(files[1], 0, 1 << 20)
        try:
            while True:
                t = reader.read_now(files[1], 0, 1 << 20, into=own)
                started.set()
                ok = bytes(memoryview(own)[t.view_offset:t.view_offset + (1 << 20)]) == expect
                with lock:
                    outcomes.append("done" if ok else "corrupt")
        except ReaderClosedError as e:
            with lock:
                outcomes.append("closed" if "reader is closed" in str(e) else repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(timeout=10)
    reader.close()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    assert outcomes.count("closed") == 4 and set(outcomes) <= {"done", "closed"}, outcomes
    with pytest.raises(ReaderClosedError, match=r"f0\.bin' at offset 0, 10 bytes: the reader is closed"):
        reader.read_now(files[0], 0, 10, into=buf)
    reader.close()  # idempotent
