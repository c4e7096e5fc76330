import threading
import time

import numpy as np
import pytest

from klotski import _C
from klotski.io import CopyEngine, DiskReader, PinnedRing, RingExhaustedError, SlotStateError


def test_slots_are_page_aligned_and_distinct():
    ring = PinnedRing(3, 10_000)
    assert ring.slot_capacity == 12_288 and ring.pinned in ("cuda", "mlock", "none")
    slots = [ring.acquire(timeout=1) for _ in range(3)]
    assert len({s.index for s in slots}) == 3
    for s in slots:
        assert s.address % 4096 == 0 and s.nbytes == 10_000 and s.capacity == 12_288
        s.numpy()[:] = s.index
    for s in slots:
        assert (s.numpy() == s.index).all()
        s.release()
    assert ring.available == 3


def test_exhausted_ring_waits_for_the_timeout_then_raises():
    ring = PinnedRing(2, 4096)
    held = [ring.acquire(), ring.acquire()]
    t0 = time.monotonic()
    with pytest.raises(RingExhaustedError, match="all 2 slots of 4096 bytes are in use after waiting"):
        ring.acquire(timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError):  # RingExhaustedError is a TimeoutError
        ring.try_acquire()
    assert held[0].live


def test_acquire_wakes_when_another_thread_releases():
    ring = PinnedRing(1, 4096)
    slot = ring.acquire()
    timer = threading.Timer(0.2, slot.release)
    timer.start()
    t0 = time.monotonic()
    again = ring.acquire(timeout=10)
    assert time.monotonic() - t0 < 5 and again.index == slot.index
    timer.join()


def test_double_release_and_use_after_release_are_errors(tmp_path):
    ring = PinnedRing(2, 8192)
    slot = ring.acquire()
    view = slot.view()
    slot.release()
    with pytest.raises(SlotStateError, match="double release"):
        slot.release()
    with pytest.raises(SlotStateError, match="use after release"):
        slot.address
    with pytest.raises(SlotStateError, match="use after release"):
        slot.numpy()
    with pytest.raises(ValueError):  # the memoryview handed out earlier was released with the slot
        view[0]
    path = tmp_path / "d.bin"
    path.write_bytes(b"a" * 8192)
    with DiskReader() as reader, pytest.raises(SlotStateError, match="use after release"):
        reader.read(str(path), 0, 10, into=slot)
    import torch

    with pytest.raises(SlotStateError, match="use after release"):
        CopyEngine("cpu").copy(slot, torch.zeros(16, dtype=torch.uint8))
    # the slot's next owner is unaffected
    fresh = [ring.acquire(), ring.acquire()]
    assert all(s.live for s in fresh) and not slot.live


def test_release_refused_while_a_read_is_in_flight(tmp_path):
    ring = PinnedRing(2, 1 << 20)

    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    scratch = _C.AlignedHostBuffer(4 << 20)
    slot = ring.acquire()
    with DiskReader(mode="POSIX", num_threads=1, chunk_bytes=4096) as reader:
        backlog = [reader.read(str(path), 0, 4 << 20, into=scratch) for _ in range(20)]  # ~20k pieces ahead
        t = reader.read(str(path), 0, 1 << 20, into=slot)
        assert not t.done()
        with pytest.raises(SlotStateError, match="in flight.*big.bin"):
            slot.release()
        t.wait(timeout=60)
        for b in backlog:
            b.wait(timeout=60)
    assert slot.numpy(0, 1 << 20).tobytes() == path.read_bytes()[: 1 << 20]
    slot.release()


def test_bad_ring_arguments():
    with pytest.raises(ValueError, match="num_slots"):
        PinnedRing(0, 4096)
    with pytest.raises(ValueError, match="pin must be one of"):
        PinnedRing(1, 4096, pin="yes")
