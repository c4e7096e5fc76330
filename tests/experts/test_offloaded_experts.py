"""OffloadedExperts on its own: equal to fused_moe_torch over all experts, whatever is resident, prefetched
or loaded mid-step; consistent after an interrupted forward; the group's thread stops on close."""
import pytest
import torch

from klotski.experts import ExpertOffloadGroup, OffloadedExperts
from klotski.triton_kernels import fused_moe_torch

ARCH = "qwen3_moe"  # 8 experts, top-3, 2 MoE layers


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    path, hf = checkpoints.get(ARCH)
    mods = [hf.model.layers[i].mlp.experts for i in range(2)]
    eb = 3 * mods[0].intermediate_dim * mods[0].hidden_dim * 4
    return path, mods, eb


def reference(experts, x, ids, w):
    return fused_moe_torch(x, experts.gate_up_proj.data, experts.down_proj.data, w, ids)


def routing(T, E, k, gen):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return ids, torch.rand(T, k, generator=gen)


def make(path, eb, slots, host, layers=2, **kw):
    cpu = 2 * (eb + 3 * 8192) + layers * host * eb  # staging ring + host experts
    group = ExpertOffloadGroup(layers, gpu_memory=layers * slots * eb, cpu_memory=cpu, **kw)
    return group, [OffloadedExperts.from_checkpoint(path, i, group=group) for i in range(layers)]


@pytest.mark.parametrize("slots,host,prefetch", [(1, 0, False), (3, 2, True), (8, 0, True)])
def test_equals_all_experts_reference(ckpt, slots, host, prefetch):
    path, hf_mods, eb = ckpt
    group, mods = make(path, eb, slots, host, prefetch=prefetch)
    gen = torch.Generator().manual_seed(0)
    try:
        for step in range(6):
            T = [1, 5, 1, 9, 2, 1][step]
            for m, ref_mod in zip(mods, hf_mods):
                x = torch.randn(T, m.hidden_size, generator=gen)
                ids, w = routing(T, m.num_experts, 3, gen)
                out = m(x, ids, w)
                ref = reference(ref_mod, x, ids, w)
                assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
                assert len(m.slot_of) <= m.num_slots and not m.loading or prefetch
        stats = group.stats()
        assert stats["forwards"] == 12
        if slots == 8:  # every expert fits: each read once, then hits only
            assert stats["disk_loads"] + stats["prefetch_loads"] <= 16
    finally:
        group.close()


def test_hottest_experts_stay_resident(ckpt):
    path, _, eb = ckpt
    group, (m,) = make(path, eb, slots=3, host=0, layers=1)
    try:
        x = torch.randn(2, m.hidden_size)
        for _ in range(3):  # experts 0 and 1 get two tokens a step: the hottest
            m(x, torch.tensor([[0, 1, 2], [0, 1, 3]]), torch.ones(2, 3))
        m(x[:1], torch.tensor([[0, 1, 5]]), torch.ones(1, 3))
        assert set(m.resident) == {0, 1, 5}
        m(x[:1], torch.tensor([[6, 6, 6]]), torch.ones(1, 3))  # one slot needed: the coldest (5) goes
        assert set(m.resident) == {0, 1, 6}
    finally:
        group.close()


def test_interrupted_forward_leaves_a_consistent_module(ckpt):
    path, hf_mods, eb = ckpt
    group, (m,) = make(path, eb, slots=2, host=1, layers=1)
    calls = {"n": 0}
    real = m.experts_fn

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    m.experts_fn = failing
    x = torch.randn(4, m.hidden_size)
    ids, w = routing(4, m.num_experts, 3, torch.Generator().manual_seed(1))
    try:
        with pytest.raises(KeyboardInterrupt):
            m(x, ids, w)
        assert not m.loading
        assert all(m.slot_expert[s] == e for e, s in m.slot_of.items())
        out = m(x, ids, w)
        assert torch.allclose(out, reference(hf_mods[0], x, ids, w), rtol=1e-5, atol=1e-6)
    finally:
        group.close()


def test_bad_inputs_are_named(ckpt):
    path, _, eb = ckpt
    group, (m,) = make(path, eb, slots=2, host=0, layers=1)
    try:
        x = torch.randn(2, m.hidden_size)
        with pytest.raises(ValueError, match="hidden_states"):
            m(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
        with pytest.raises(ValueError, match="topk_weights"):
            m(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2))
        with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 8\)"):
            m(x, torch.full((2, 3), 9), torch.ones(2, 3))
    finally:
        group.close()


def test_close_stops_the_loader_thread(ckpt):
    path, _, eb = ckpt
    group, _ = make(path, eb, slots=2, host=0, layers=1)
    thread = group._thread
    group.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        group.submit(lambda: None, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_equals_cpu_reference(ckpt, prefetch):
    path, hf_mods, eb = ckpt
    group = ExpertOffloadGroup(2, gpu_memory=2 * 2 * eb, cpu_memory=2 * (eb + 3 * 8192) + 2 * eb, prefetch=prefetch)
    mods = [OffloadedExperts.from_checkpoint(path, i, group=group, device="cuda") for i in range(2)]
    gen = torch.Generator().manual_seed(0)
    try:
        for T in [1, 7, 1, 3]:
            for m, ref_mod in zip(mods, hf_mods):
                x = torch.randn(T, m.hidden_size, generator=gen)
                ids, w = routing(T, m.num_experts, 3, gen)
                out = m(x.cuda(), ids.cuda(), w.cuda())
                assert out.device.type == "cuda"
                torch.testing.assert_close(out.cpu(), reference(ref_mod, x, ids, w), rtol=1e-4, atol=1e-5)
        assert group.stats()["disk_loads"] > 0
    finally:
        group.close()


def test_failed_read_is_raised_and_forgotten(ckpt):
    path, hf_mods, eb = ckpt
    group, (m,) = make(path, eb, slots=2, host=0, layers=1)
    real = m.source.read_staged
    state = {"fail": True}

    def flaky(expert, reader, slot):
        if state["fail"]:
            raise OSError(f"injected read error for expert {expert}")
        return real(expert, reader, slot)

    m.source.read_staged = flaky
    x = torch.randn(3, m.hidden_size)
    ids, w = routing(3, m.num_experts, 3, torch.Generator().manual_seed(2))
    try:
        with pytest.raises(OSError, match="injected"):
            m(x, ids, w)
        assert not m.loading and not m.slot_of and m.slot_expert == [-1, -1]
        state["fail"] = False
        out = m(x, ids, w)
        assert torch.allclose(out, reference(hf_mods[0], x, ids, w), rtol=1e-5, atol=1e-6)
    finally:
        group.close()


def test_correlated_routing_is_prefetched(ckpt):
    """Layer 1 routes the same experts as layer 0 did for the same token: once learned, layer 1's experts are
    loaded while layer 0 computes, and layer 1 needs no demand load."""
    path, hf_mods, eb = ckpt
    group, mods = make(path, eb, slots=3, host=0, prefetch=True)
    x = torch.randn(1, mods[0].hidden_size)
    patterns = [torch.tensor([[0, 1, 2]]), torch.tensor([[4, 5, 6]])]
    w = torch.ones(1, 3) / 3
    try:
        for step in range(6):
            ids = patterns[step % 2]
            for m, ref_mod in zip(mods, hf_mods):
                out = m(x, ids, w)
                assert torch.allclose(out, reference(ref_mod, x, ids, w), rtol=1e-5, atol=1e-6)
        last = mods[1].last_forward
        assert last["prefetch_used"] == 3 and last["loads"] == 0
        assert mods[0].last_forward["loads"] == 3  # layer 0 has no earlier layer to predict from
    finally:
        group.close()
