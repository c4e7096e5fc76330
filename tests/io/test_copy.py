import numpy as np
import pytest
import torch

from klotski.io import CopyEngine, CudaError, PinnedRing, cuda_available


def test_cpu_copy_from_slot_lands_bytes_in_order():
    ring = PinnedRing(2, 1 << 16)
    slot = ring.acquire()
    src = slot.numpy(0, 1 << 16)
    src[:] = np.arange(1 << 16, dtype=np.uint64).astype(np.uint8)
    engine = CopyEngine("cpu")
    dst = torch.zeros(1 << 14, dtype=torch.float32)
    events = [engine.copy(slot, dst[i * 1024:(i + 1) * 1024], src_offset=i * 4096) for i in range(16)]
    events[-1].wait()  # CPU mode: blocks until copied; copies run in submission order
    assert all(e.done() for e in events)
    assert dst.view(torch.uint8).numpy().tobytes() == src.tobytes()
    del src
    slot.release()
    engine.close()


def test_cpu_copy_from_host_tensor_and_partial_nbytes():
    engine = CopyEngine("cpu")
    src = torch.arange(100, dtype=torch.bfloat16)
    dst = torch.zeros(100, dtype=torch.bfloat16)
    ev = engine.copy(src, dst, src_offset=20, nbytes=40)
    ev.synchronize(timeout=5)
    assert torch.equal(dst[:20], src[10:30]) and not dst[20:].any()


def test_copy_validates_tensors():
    engine = CopyEngine("cpu")
    ring = PinnedRing(1, 4096)
    slot = ring.acquire()
    with pytest.raises(ValueError, match="contiguous"):
        engine.copy(slot, torch.zeros(8, 8)[:, 0])
    with pytest.raises(ValueError, match="exceeds slot"):
        engine.copy(slot, torch.zeros(2048, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not fit dst"):
        engine.copy(slot, torch.zeros(4), nbytes=17)
    with pytest.raises(ValueError, match="is on meta"):
        engine.copy(slot, torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="Slot or a CPU torch.Tensor"):
        engine.copy(b"abc", torch.zeros(4))


@pytest.mark.skipif(cuda_available(), reason="checks the no-CUDA error path")
def test_cuda_engine_without_cuda_is_a_clear_error():
    with pytest.raises((CudaError, RuntimeError), match="CUDA"):
        CopyEngine("cuda:0")
    with pytest.raises(CudaError, match="pin='cuda' needs a CUDA runtime"):
        PinnedRing(1, 4096, pin="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_available(), reason="needs a CUDA GPU")
def test_cuda_copy_from_pinned_slot_on_a_side_stream():
    ring = PinnedRing(2, 4 << 20)
    assert ring.pinned == "cuda"
    slot = ring.acquire()
    host = slot.tensor(torch.float32, (1 << 20,))
    host.copy_(torch.randn(1 << 20))
    dst = torch.empty(1 << 20, device="cuda")
    side = torch.cuda.Stream()
    ev = CopyEngine("cuda").copy(slot, dst, stream=side)
    ev.wait(torch.cuda.current_stream())
    out = (dst * 1).cpu()  # runs on the compute stream after the copy
    assert torch.equal(out, host)
    ev.synchronize()
    del host
    slot.release()
