"""DeepSeek-V2/V3 tiny checkpoints: the resident engine against transformers, the latent KV cache, MTP layers."""
import functools
import os

import pytest
import torch
from safetensors.torch import save_file

import hf_models
from klotski import LLM, SamplingParams
from klotski.checkpoint import CheckpointError
from klotski.model import decoder
from klotski.model.mla import mla_attention

PROMPTS = hf_models.PROMPTS
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

# (arch, overrides): q_lora on/off, grouped routing on/off; every variant has a dense first layer (of 3) and
# 2 shared experts; V2 has softmax scores (+ group max), V3 sigmoid + e_score_correction_bias (+ top-2 sums).
VARIANTS = {
    "v2-qlora-grouped": ("deepseek_v2", {}),
    "v2-noqlora-greedy": ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1,
                                          "topk_group": 1}),
    "v3-qlora-grouped": ("deepseek_v3", {}),
    "v3-noqlora-flat-halves": ("deepseek_v3", {"q_lora_rank": None, "n_group": 1, "topk_group": 1,
                                               "rope_interleave": False}),
}


rel_err = hf_models.rel_err
check_against_transformers = hf_models.check_against_transformers


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_logits_match_transformers(checkpoints, variant, fused):
    arch, overrides = VARIANTS[variant]
    path, hf = checkpoints.get(arch, fused=fused, **overrides)
    llm = check_against_transformers(path, hf)
    spec = llm.spec
    assert spec.attention == "mla" and spec.layer_kinds == ("dense", "moe", "moe")
    assert bool(spec.q_lora_rank) == ("noqlora" not in variant)
    assert llm.weights.layout.fused == fused


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_both_attention_forms_match_transformers(checkpoints, monkeypatch, arch, absorb):
    """The default picks per call (absorbed for these short prompts); force each form."""
    path, hf = checkpoints.get(arch)
    monkeypatch.setitem(decoder.ATTENTION, "mla", functools.partial(mla_attention, absorb=absorb))
    check_against_transformers(path, hf)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_kv_bytes_per_token_equal_what_the_cache_allocates(checkpoints, arch, dtype):
    path, _ = checkpoints.get(arch)
    llm = LLM(path, device="cpu", dtype=dtype)
    spec, model = llm.spec, llm.executor
    batch, capacity = 3, 40
    cache = model.new_cache(batch, capacity, torch.tensor([0, 2, 5]))
    model.forward(torch.randint(0, spec.vocab_size, (batch, 7)), cache)
    model.forward(torch.randint(0, spec.vocab_size, (batch, 1)), cache)
    itemsize = torch.empty((), dtype=llm.dtype).element_size()
    per_token = spec.kv_cache_elems_per_token() * itemsize * spec.num_layers
    assert cache.nbytes() == per_token * batch * capacity
    assert spec.kv_cache_elems_per_token() == spec.kv_lora_rank + spec.qk_rope_head_dim  # latent, not K/V
    shapes = {name: tuple(t.shape) for name, t in cache.layers[0].items()}
    assert shapes == {"latent": (batch, capacity, spec.kv_lora_rank), "k_rope": (batch, capacity, spec.qk_rope_head_dim)}


def test_bf16_checkpoint_close_to_fp32_reference(checkpoints):
    path, hf = checkpoints.get("deepseek_v3", dtype="bfloat16")
    llm = LLM(path, device="cpu", dtype="bfloat16")
    moe = llm.executor.layers[1]
    assert moe["router"].dtype == torch.bfloat16 and moe["router_bias"].dtype == torch.float32  # as transformers
    for ours, prompt in zip(llm.logits(PROMPTS), PROMPTS):
        assert rel_err(ours, hf_models.hf_logits(hf, prompt)) < 5e-2


def test_router_bias_and_rope_layout_matter(checkpoints):
    """Guards against a vacuous match: ignoring the V3 bias or the interleaved rope layout breaks it."""
    path, hf = checkpoints.get("deepseek_v3")
    llm = LLM(path, device="cpu", dtype="float32")
    refs = [hf_models.hf_logits(hf, p) for p in PROMPTS]
    for layer in llm.executor.layers:
        if "router_bias" in layer:
            layer["router_bias"].zero_()
    assert max(rel_err(o, r) for o, r in zip(llm.logits(PROMPTS), refs)) > 1e-2
    import dataclasses

    llm = LLM(path, device="cpu", dtype="float32")
    llm.executor.spec = dataclasses.replace(llm.spec, rope=dataclasses.replace(llm.spec.rope, interleaved=False))
    assert max(rel_err(o, r) for o, r in zip(llm.logits(PROMPTS), refs)) > 1e-3


def test_yarn_softmax_scale_matters(checkpoints, monkeypatch):
    from klotski.model import mla

    path, hf = checkpoints.get("deepseek_v2")
    llm = LLM(path, device="cpu", dtype="float32")
    monkeypatch.setattr(mla, "softmax_scale", lambda spec: spec.q_head_dim**-0.5)  # without mscale^2
    refs = [hf_models.hf_logits(hf, p) for p in PROMPTS]
    assert max(rel_err(o, r) for o, r in zip(llm.logits(PROMPTS), refs)) > 1e-3


def add_tensors(path, name, tensors):
    save_file(tensors, os.path.join(path, name))


def test_v3_multi_token_prediction_layer_is_ignored(checkpoints, tmp_path):
    import shutil

    src, hf = checkpoints.get("deepseek_v3")
    path = str(tmp_path / "with-mtp")
    shutil.copytree(src, path)
    H = 64
    add_tensors(path, "mtp.safetensors", {  # what real V3 checkpoints append as layer num_hidden_layers
        "model.layers.3.eh_proj.weight": torch.zeros(H, 2 * H),
        "model.layers.3.enorm.weight": torch.ones(H),
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": torch.zeros(40, H),
        "model.layers.3.mlp.experts.0.up_proj.weight": torch.zeros(24, H),
        "model.layers.3.shared_head.head.weight": torch.zeros(128, H),
    })
    check_against_transformers(path, hf)
    add_tensors(path, "stray.safetensors", {"model.layers.1.mlp.something_else": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.mlp.something_else'"):
        LLM(path, device="cpu", dtype="float32")


def test_v2_extra_layer_still_rejected(checkpoints, tmp_path):
    import shutil

    src, _ = checkpoints.get("deepseek_v2")
    path = str(tmp_path / "extra")
    shutil.copytree(src, path)
    add_tensors(path, "extra.safetensors", {"model.layers.3.enorm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.3.enorm.weight'"):
        LLM(path, device="cpu", dtype="float32")


def test_missing_mla_tensor_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file

    src, _ = checkpoints.get("deepseek_v2", q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)
    path = str(tmp_path / "missing")
    shutil.copytree(src, path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.self_attn.kv_b_proj.weight' "
                                              r"\(expected shape \[128, 32\]\)"):
        LLM(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_offloaded_klotski_policy_matches_resident(checkpoints, tmp_path, arch):
    """Latent KV cache and MLA weights through the offloaded runtime, experts streamed from disk."""
    path, _ = checkpoints.get(arch)
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in LLM(path, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=sp)]
    llm = LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB",
              offload_dir=str(tmp_path / "off"), num_batches=2, batch_size=2)
    try:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp)]
        assert llm.metrics.extra["weights_per_tier"]["disk"] > 0
    finally:
        llm.close()
    assert out == ref
