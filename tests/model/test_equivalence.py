"""The resident engine against transformers: greedy tokens identical, logits within fp32 tolerance."""
import pytest
import torch

import hf_models
from klotski import LLM, SamplingParams

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
PROMPTS = hf_models.PROMPTS
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


rel_err = hf_models.rel_err


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "dtype,fused,sharded",
    [("float32", False, False), ("float32", True, True), ("bfloat16", False, True), ("bfloat16", True, False)],
)
def test_greedy_and_logits_match_transformers(checkpoints, arch, dtype, fused, sharded):
    path, hf = checkpoints.get(arch, dtype=dtype, fused=fused, sharded=sharded)
    hf_models.check_against_transformers(path, hf)


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
