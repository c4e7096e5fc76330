"""Expert slices: they cover the expert exactly, their partial outputs sum to the expert's output, loads are
counted, and the slot pool refuses to overflow."""
import pytest
import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.distributed.slices import HostSlices, SlotPool, split_slice
from klotski.model import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.triton_kernels.fused_moe import fused_moe_torch


@pytest.fixture
def weights(checkpoints):
    model_dir, _ = checkpoints.get("mixtral")
    spec = ModelSpec.from_pretrained(model_dir)
    return CheckpointWeights(SafetensorsIndex(model_dir), spec)


def test_slices_cover_the_expert_and_sum_to_its_output(weights):
    spec = weights.spec
    host = HostSlices(weights, torch.float32, num_slices=5)  # I = 48: widths 10, 10, 10, 9, 9
    assert [host.width(s) for s in range(5)] == [10, 10, 10, 9, 9]
    w13, w2 = weights.read_expert(0, 2, torch.float32)
    inter = spec.moe_intermediate_size
    parts = [split_slice(host.slices[0][2][s], spec.hidden_size, host.width(s)) for s in range(5)]
    torch.testing.assert_close(torch.cat([p[0][: host.width(s)] for s, p in enumerate(parts)]), w13[:inter],
                               atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([p[0][host.width(s):] for s, p in enumerate(parts)]), w13[inter:],
                               atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], dim=1), w2, atol=0, rtol=0)
    # y = sum_s W2[:, s] (act(W1[s] x) * W3[s] x), every slice's partial accumulated in fp32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, spec.hidden_size, generator=g)
    ids = torch.tensor([[2, 0]] * 7)
    tw = torch.rand(7, 2, generator=g)
    table = torch.tensor([-1, -1, 0, -1], dtype=torch.int32)
    whole = fused_moe_torch(h, w13[None], w2[None], tw, ids, expert_slots=table)
    out = torch.zeros(7, spec.hidden_size)
    for a13, a2 in parts:
        fused_moe_torch(h, a13[None], a2[None], tw, ids, expert_slots=table, out=out)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)


def test_loads_are_counted(weights):
    host = HostSlices(weights, torch.float32, num_slices=2)
    buf = torch.empty(host.max_slice_numel)
    host.load(1, 3, 1, buf)
    host.load(1, 3, 1, buf)
    assert host.reads[(1, 3, 1)] == 2
    assert host.bytes_read == 2 * 3 * 24 * weights.spec.hidden_size * 4


def test_slot_pool_refuses_to_overflow():
    pool = SlotPool(2, 8, torch.float32, torch.device("cpu"))
    a, b = pool.acquire("a"), pool.acquire("b")
    assert {a, b} == {0, 1} and pool.peak == 2
    with pytest.raises(RuntimeError, match="slot pool exhausted .*acquiring c"):
        pool.acquire("c")
    pool.release(a)
    assert pool.acquire("c") == a
