"""load_record: one native call reads a record into a ring slot and copies its parts to the device."""
import numpy as np
import pytest
import torch

from klotski import _C
from klotski.io import (CopyEngine, DiskReader, PinnedRing, ShortReadError, convert_code, copy_part, io_uring_info,
                        load_record)

ENGINES = [("threads", False), ("threads", True)] + ([("uring", True)] if io_uring_info()["available"] else [])


def _record_file(tmp_path, values: np.ndarray, lead: int = 4096 + 100):
    """``values``' bytes at offset ``lead`` (not page-aligned) of a file of random bytes."""
    raw = values.tobytes()
    data = np.random.default_rng(1).integers(0, 256, lead + len(raw) + 5000, dtype=np.uint8).tobytes()
    data = data[:lead] + raw + data[lead + len(raw):]
    path = tmp_path / "rec.bin"
    path.write_bytes(data)
    return str(path), lead, len(raw)


@pytest.mark.parametrize("engine,queued", ENGINES)
@pytest.mark.parametrize("mode", ["AUTO", "POSIX"])
def test_parts_land_as_stored_and_widened(tmp_path, engine, queued, mode):
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((64, 96), dtype=np.float32)).to(torch.bfloat16)
    b = torch.from_numpy(rng.standard_normal((96, 32), dtype=np.float32)).to(torch.bfloat16)
    raw = np.concatenate([a.view(torch.int16).numpy().ravel(), b.view(torch.int16).numpy().ravel()])
    path, offset, nbytes = _record_file(tmp_path, raw)
    ring = PinnedRing(2, 64 << 10)
    dst_a = torch.empty(64, 96, dtype=torch.float32)  # widened, as the CPU runtime's fp32 pool
    dst_b = torch.empty(96, 32, dtype=torch.bfloat16)  # as stored
    parts = [copy_part(0, torch.bfloat16, a.numel() * 2, dst_a), copy_part(a.numel() * 2, torch.bfloat16, b.numel() * 2, dst_b)]
    engine_ = CopyEngine("cpu")
    with DiskReader(mode=mode, engine=engine, num_threads=3, queue_depth=3, chunk_bytes=4096) as reader:
        slot = ring.acquire()
        ev, read_s = load_record(reader, engine_, path, offset, nbytes, slot, parts, queued=queued)
        assert ev.done() and read_s >= 0
        slot.release()
    engine_.close()
    assert torch.equal(dst_a, a.float()) and torch.equal(dst_b, b)


def test_fp16_widening_matches_torch_on_every_value():
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)  # every fp16: subnormals, inf, nan
    src = bits.view(torch.float16).contiguous()
    out = torch.empty(src.numel(), dtype=torch.float32)
    _C.widen_to_f32(src.data_ptr(), out.data_ptr(), src.numel(), 2)
    want = src.float()
    same = (out == want) | (torch.isnan(out) & torch.isnan(want))
    assert bool(same.all()) and torch.equal(torch.signbit(out), torch.signbit(want))
    bf = bits.view(torch.bfloat16).contiguous()
    _C.widen_to_f32(bf.data_ptr(), out.data_ptr(), bf.numel(), 1)
    assert torch.equal(out.view(torch.int32), bf.float().view(torch.int32))


def test_convert_codes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert convert_code(torch.bfloat16, torch.bfloat16, cpu) == 0
    assert convert_code(torch.bfloat16, torch.float32, cpu) == 1
    assert convert_code(torch.float16, torch.float32, cpu) == 2
    assert convert_code(torch.bfloat16, torch.float32, cuda) is None  # CUDA copies move bytes as stored
    assert convert_code(torch.float32, torch.bfloat16, cpu) is None


def test_bad_parts_and_reads_are_refused_with_names(tmp_path):
    raw = np.arange(1000, dtype=np.int16)
    path, offset, nbytes = _record_file(tmp_path, raw)
    with pytest.raises(ValueError, match="need a destination of 4000 bytes"):
        copy_part(0, torch.bfloat16, 2000, torch.empty(999, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        copy_part(0, torch.bfloat16, 2000, torch.empty(100, 20, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="no native copy"):
        copy_part(0, torch.float32, 2000, torch.empty(1000, dtype=torch.bfloat16))
    ring, engine = PinnedRing(1, 8192), CopyEngine("cpu")
    dst = torch.empty(1000, dtype=torch.int16)
    with DiskReader(mode="AUTO") as reader:
        slot = ring.acquire()
        with pytest.raises(ValueError, match=r"rec\.bin.*part 0 \[100, 2100\) lies outside the record's 2000 bytes"):
            load_record(reader, engine, path, offset, nbytes, slot, [(100, dst.data_ptr(), 2000, 0)])
        with pytest.raises(FileNotFoundError, match="nope.bin"):
            load_record(reader, engine, str(tmp_path / "nope.bin"), 0, 10, slot, [])
        with pytest.raises(ShortReadError):
            load_record(reader, engine, path, offset + 6000, nbytes, slot, [])  # runs past the end of the file
        slot.release()
    engine.close()


def test_cpu_copy_spans_run_on_the_copy_thread():
    """CopyEngine.copy on the CPU goes through the spans path: one task, in order, event done after it."""
    ring, engine = PinnedRing(1, 4096), CopyEngine("cpu")
    slot = ring.acquire()
    slot.numpy(0, 4096)[:] = np.arange(4096, dtype=np.uint32).astype(np.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    ev = engine.copy(slot, dst)
    ev.synchronize(5.0)
    assert bytes(dst.numpy()) == bytes(slot.numpy(0, 4096))
    slot.release()
    engine.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_record_load_on_a_side_stream(tmp_path):
    """On CUDA the copies run on the given stream and the event orders the compute stream after them."""
    a = torch.randn(256, 512, dtype=torch.bfloat16)
    path, offset, nbytes = _record_file(tmp_path, a.view(torch.int16).numpy())
    ring = PinnedRing(2, 1 << 20, pin="cuda")
    dst = torch.empty(256, 512, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    engine = CopyEngine("cuda")
    with DiskReader() as reader:
        slot = ring.acquire()
        ev, _ = load_record(reader, engine, path, offset, nbytes, slot, [copy_part(0, torch.bfloat16, nbytes, dst)],
                            stream=side, synchronize=False)
        ev.wait(torch.cuda.current_stream())
        out = dst.float().cpu()
        ev.synchronize()
        slot.release()
    assert torch.equal(out, a.float())
    with pytest.raises(ValueError, match="no native copy"):
        copy_part(0, torch.bfloat16, nbytes, torch.empty(256, 512, dtype=torch.float32, device="cuda"))
