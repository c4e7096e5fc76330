"""The resident engine against transformers: greedy tokens identical, logits within fp32 tolerance."""
import pytest
import torch

import hf_models
from klotski import LLM, SamplingParams

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "dtype,fused,sharded",
    [("float32", False, False), ("float32", True, True), ("bfloat16", False, True), ("bfloat16", True, False)],
)
def test_greedy_and_logits_match_transformers(checkpoints, arch, dtype, fused, sharded):
    path, hf = checkpoints.get(arch, dtype=dtype, fused=fused, sharded=sharded)
    llm = LLM(path, device="cpu", dtype="float32")
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == [hf_models.hf_greedy(hf, p, 16) for p in PROMPTS]
    for ours, prompt in zip(llm.logits(PROMPTS), PROMPTS):
        ref = hf_models.hf_logits(hf, prompt)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_compute_close_to_fp32(checkpoints, arch):
    path, hf = checkpoints.get(arch, dtype="bfloat16")
    llm = LLM(path, device="cpu", dtype="bfloat16")
    assert llm.dtype == torch.bfloat16
    for ours, prompt in zip(llm.logits(PROMPTS), PROMPTS):
        assert rel_err(ours, hf_models.hf_logits(hf, prompt)) < 5e-2


def test_zeroing_one_layers_experts_changes_logits_far_beyond_tolerance(checkpoints):
    path, hf = checkpoints.get("mixtral")
    llm = LLM(path, device="cpu", dtype="float32")
    base = llm.logits(PROMPTS)
    llm.executor.layers[1]["w2"].zero_()
    broken = llm.logits(PROMPTS)
    assert min(rel_err(b, a) for a, b in zip(base, broken)) > 1e-2  # >100x the 1e-4 tolerance


def test_batched_equals_one_by_one(checkpoints):
    path, _ = checkpoints.get("qwen2_moe")
    llm = LLM(path, device="cpu", dtype="float32")
    together = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in PROMPTS]
    assert together == alone
