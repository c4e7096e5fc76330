"""Chunked prefill in the planner: the halving rule, the pass shape, and a group whose whole-prompt activations do
not fit the device planned in passes of the largest chunk that fits (priced as that many passes), never above the
candidate's bound."""
import pytest

from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.prefill_chunks import chunk_sizes, num_chunks, prefill_shape
from klotski.presets import model_config
from klotski.schedule import static_memory

MIXTRAL = ModelCosts.from_config(model_config("mixtral-8x7b"), name="mixtral-8x7b")


def test_chunk_sizes_halve_down_to_one():
    assert chunk_sizes(512) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert chunk_sizes(5) == [5, 3, 2, 1]
    assert chunk_sizes(1) == [1]
    assert [num_chunks(5, c) for c in chunk_sizes(5)] == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        chunk_sizes(0)
    with pytest.raises(ValueError, match="prefill chunk must be in 1..512"):
        prefill_shape(1, 1, 512, 600, 513)


@pytest.mark.parametrize("chunk", [512, 128, 64, 16])
def test_passes_attend_over_the_same_keys_as_one_pass(chunk):
    """num_chunks passes at the mean past length read the keys one causal pass over the prompt reads."""
    whole = prefill_shape(4, 2, 512, 600)
    part = prefill_shape(4, 2, 512, 600, chunk)
    assert (part.q_len, part.context_len) == (chunk, 600)
    _, score_whole, _ = MIXTRAL.attn_flops(0, 4, whole.q_len, whole.past_len)
    _, score_part, _ = MIXTRAL.attn_flops(0, 4, part.q_len, part.past_len)
    assert num_chunks(512, chunk) * score_part == pytest.approx(score_whole, rel=1e-12)


def test_a_group_too_large_to_prefill_whole_is_planned_in_passes():
    hw = preset("rtx3090").with_memory(gpu_memory="24GB", cpu_memory="256GB")
    planner = Planner(MIXTRAL, hw, 512, 32)
    b, n = 128, 20
    whole, _ = planner.shapes(b, n)
    p = planner.place("flexgen", b, n, "cpu", None, True)
    assert p is not None and p.prefill_chunk is not None and p.prefill_chunk < 512
    assert static_memory(MIXTRAL, p, whole, "flexgen")["gpu"] > hw.gpu_memory  # whole: it would not fit
    # the largest chunk that fits: the leanest placement with the next larger chunk exceeds the device
    larger = chunk_sizes(512)[chunk_sizes(512).index(p.prefill_chunk) - 1]
    lean = p.__class__(attn="cpu", gate="cpu", shared="cpu", experts_gpu=0, experts_cpu=p.experts_cpu, kv="cpu",
                       prefill_chunk=larger)
    pre, dec = planner.simulate("flexgen", lean, b, n, None, True)
    assert max(pre.peak_mem["gpu"], dec.peak_mem["gpu"]) > hw.gpu_memory
    plan = planner.score("flexgen", p, b, n, None, True)
    assert planner.fits(plan)
    pre, _ = planner.simulate("flexgen", p, b, n, None, True)
    assert plan.prefill_s == pytest.approx(num_chunks(512, p.prefill_chunk) * pre.makespan)
    assert planner.upper_bound("flexgen", b, n, "cpu", None, True) >= plan.tokens_per_s
    assert f"passes of {p.prefill_chunk} columns" in plan.describe(MIXTRAL.spec.num_experts)
