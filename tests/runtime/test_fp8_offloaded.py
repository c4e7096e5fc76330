"""Offloaded policies on an fp8 block-scaled checkpoint give the resident engine's tokens, with fp8 bytes +
scales on the host and disk tiers (dequantized into device buffers)."""
import pytest

import hf_models
from klotski import LLM, SamplingParams

PROMPTS = hf_models.PROMPTS
SP = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# (policy, packed store?, gpu, cpu): experts from the store + host fp8 copies; host tier + checkpoint pieces;
# attention, shared experts and experts all on disk. (flexgen-ckpt: with the prefill chunked the KV fits the
# device and 200 KiB of host memory held every expert, so nothing was left on disk; 140 KiB holds one per layer)
RUNS = [("klotski", True, "700KiB", "120KiB"), ("flexgen", False, "700KiB", "140KiB"),
        ("flexgen", True, "560KiB", "120KiB")]


@pytest.fixture(scope="module")
def fp8_model(fp8_checkpoints):
    fp8, _, _ = fp8_checkpoints.get()
    ref = [o.token_ids for o in LLM(fp8, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return fp8, ref


@pytest.mark.parametrize("policy,store,gpu,cpu", RUNS, ids=["klotski-store", "flexgen-ckpt", "flexgen-all-disk"])
def test_offloaded_fp8_matches_resident(fp8_model, tmp_path, policy, store, gpu, cpu):
    path, ref = fp8_model
    llm = LLM(path, device="cpu", policy=policy, gpu_memory=gpu, cpu_memory=cpu, num_batches=2, batch_size=2,
              offload_dir=str(tmp_path / "off") if store else None)
    try:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        m = llm.metrics.extra
        w = llm.executor.w
    finally:
        llm.close()
    assert out == ref
    assert m["bytes_disk_read"] > 0 and m["weights_per_tier"]["disk"] > 0
    spec = w.spec
    I, H = spec.moe_intermediate_size, spec.hidden_size
    homes = [w.expert_home[(layer, e)] for layer in spec.moe_layers for e in range(spec.num_experts)]
    for tier, what in homes:  # what each tier holds is fp8 + scales
        if tier == "store":
            assert what.block == (16, 24) and what.nbytes < 3 * I * H * 2 * 0.6
        elif tier == "disk":
            assert what[1].scale_inv is not None and what[1].stored_nbytes < H * I * 2 * 0.6
        elif tier == "cpu":
            assert what[0].block == (16, 24) and what[0].nbytes < 2 * I * H * 2 * 0.6
    assert {t for t, _ in homes} & {"store", "disk"}
