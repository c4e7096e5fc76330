"""The resident engine on CUDA (Triton fused_moe path) against transformers. Skipped without a GPU."""
import pytest
import torch

import hf_models
from klotski import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_cuda_fp32_greedy_matches_transformers(checkpoints, arch):
    path, hf = checkpoints.get(arch)
    llm = LLM(path, device="cuda", dtype="float32")
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_models.hf_greedy(hf, p, 16) for p in PROMPTS]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_cuda_bf16_logits_close(checkpoints, arch):
    path, hf = checkpoints.get(arch, dtype="bfloat16")
    llm = LLM(path, device="cuda", dtype="bfloat16")
    for ours, p in zip(llm.logits(PROMPTS), PROMPTS):
        ref = hf_models.hf_logits(hf, p)
        assert float((ours - ref).abs().max() / ref.abs().max()) < 5e-2
