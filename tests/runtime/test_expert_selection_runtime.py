"""Expert selection wired into the engines: LLM(expert_selection=...) under the resident engine and every
offloaded policy; prefill stays exact, "lynx:0" is exact routing, metrics count what changed."""
import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.hardware import preset

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3], [5, 6, 7, 8], [9, 2, 4], [6, 6, 1],
           [11, 5]]
SP = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    path, _ = checkpoints.get("mixtral")
    return path


def tokens(llm):
    return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]


def offloaded(path, tmp_path, policy, selection, gpu="700KiB", cpu="200KiB", n=1, b=len(PROMPTS)):
    """Planned on a fixed profile: which experts stay resident must not depend on the machine running the test."""
    return LLM(path, device="cpu", policy=policy, gpu_memory=gpu, cpu_memory=cpu, num_batches=n, batch_size=b,
               offload_dir=str(tmp_path / f"off-{policy}-{selection}"), expert_selection=selection,
               hardware=preset("rtx3090"))


def test_resident_prefill_exact_decode_selected(mixtral):
    exact = LLM(mixtral, device="cpu")
    sel = LLM(mixtral, device="cpu", expert_selection="lynx:1.0")
    for a, b in zip(exact.logits(PROMPTS), sel.logits(PROMPTS)):
        assert torch.equal(a, b)  # prefill: bit-identical
    ref, out = tokens(exact), tokens(sel)
    assert [t[0] for t in out] == [t[0] for t in ref]  # the first token comes from the prefill
    m = sel.metrics.extra
    assert m["expert_selection"] == "lynx:1" and m["selection_decode_steps"] == SP.max_tokens - 1
    assert m["selection_remapped"] > 0
    for layer, d in m["selection_distinct_per_layer"].items():
        assert d <= m["selection_distinct_exact_per_layer"][layer]
    assert sum(m["selection_distinct_per_layer"].values()) < sum(m["selection_distinct_exact_per_layer"].values())
    counted = LLM(mixtral, device="cpu", expert_selection="lynx:0")
    assert tokens(counted) == ref and counted.metrics.extra["selection_remapped"] == 0
    assert exact.metrics.extra == {}


@pytest.mark.parametrize("policy", ["klotski", "flexgen", "layerwise"])
def test_offloaded_policies_select_like_the_resident_engine(mixtral, tmp_path, policy):
    """One micro-batch holding the whole batch: each gate sees what the resident engine's router sees, so
    plain selection picks the same experts and the tokens match; prefill logits stay bit-identical."""
    ref = LLM(mixtral, device="cpu", expert_selection="lynx:1.0")
    want = tokens(ref)
    with offloaded(mixtral, tmp_path, policy, "lynx:1.0") as llm:
        assert tokens(llm) == want
        m = llm.metrics.extra
        assert m["selection_remapped"] == ref.metrics.extra["selection_remapped"]
        assert m["selection_distinct_per_layer"] == pytest.approx(ref.metrics.extra["selection_distinct_per_layer"])
        with offloaded(mixtral, tmp_path, policy, "off") as exact:
            for a, b in zip(exact.logits(PROMPTS), llm.logits(PROMPTS)):
                assert torch.equal(a, b)


def test_prefill_in_one_column_chunks_stays_exact(mixtral, tmp_path, monkeypatch):
    """A prefill the executor runs one column at a time (the last resort of its chunking) passes one column on
    a non-empty cache, like a decode step; it must not be selected: bit-identical logits, no decode step."""
    import klotski.runtime.executor as executor

    monkeypatch.setattr(executor, "chunk_sizes", lambda S: [1])
    with offloaded(mixtral, tmp_path, "klotski", "lynx:1.0") as sel, \
            offloaded(mixtral, tmp_path, "klotski", "off") as exact:
        for a, b in zip(exact.logits(PROMPTS), sel.logits(PROMPTS)):
            assert torch.equal(a, b)
        assert sel.executor.time["prefill_chunks"] == max(map(len, PROMPTS))  # it did run column by column
        m = sel.executor.compute.selection_metrics()
        assert m["selection_decode_steps"] == 0 and m["selection_remapped"] == 0


def test_offload_aware_changes_nothing_when_every_expert_is_resident(mixtral, tmp_path):
    exact = tokens(LLM(mixtral, device="cpu"))
    with offloaded(mixtral, tmp_path, "klotski", "lynx-offload:1.0", gpu=None, cpu=None, n=2, b=4) as llm:
        assert tokens(llm) == exact
        assert llm.metrics.extra["selection_remapped"] == 0


@pytest.mark.parametrize("policy", ["flexgen", "layerwise"])
def test_offload_aware_is_exact_where_whole_layers_load(mixtral, tmp_path, policy):
    exact = tokens(LLM(mixtral, device="cpu"))
    with offloaded(mixtral, tmp_path, policy, "lynx-offload:1.0", n=2, b=4) as llm:
        assert tokens(llm) == exact
        assert llm.metrics.extra["selection_remapped"] == 0


def test_free_set_holds_resident_prefetched_and_earlier_micro_batch_experts(mixtral, tmp_path):
    with offloaded(mixtral, tmp_path, "klotski", "lynx-offload:1.0", gpu="1200KiB", cpu="300KiB", n=2, b=4) as llm:
        tokens(llm)
        assert llm.metrics.extra["selection_decode_steps"] == SP.max_tokens - 1
        ex, layer = llm.executor, llm.spec.moe_layers[0]
        E = llm.spec.num_experts
        resident = {e for e in range(E) if ex.w.expert_tier(layer, e) == "gpu"}
        assert 0 < len(resident) < E  # the budget splits the experts
        costly = [e for e in range(E) if e not in resident]

        stats = ex.compute.selection_stats
        stats.begin_step("test")
        stats.record(layer, torch.tensor([[costly[-1]]]), torch.tensor([[costly[-1]]]), 0)
        free = set(ex.compute.free_experts(layer, costly[:1], torch.device("cpu")).nonzero().flatten().tolist())
        assert free == resident | {costly[0], costly[-1]}


@pytest.mark.parametrize("bad", ["lynx:2", "fast", 1.0])
def test_bad_expert_selection_is_refused(mixtral, bad):
    with pytest.raises(ValueError, match="expert_selection"):
        LLM(mixtral, device="cpu", expert_selection=bad)
