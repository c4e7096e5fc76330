"""fp8 block-scaled checkpoints (DeepSeek-V3 format): dequantization, the resident engine, errors, stored bytes.

The fp8 checkpoint and its dequantized twin (tests/fp8_models.py) hold the same values: dequantizing is one
fp32 multiply ``fp32(q) * scale`` rounded once to the compute dtype, whether Klotski does it at load time or
the twin stores the fp32 product (and Klotski rounds it when loading). So logits must be *identical* (no
tolerance) in fp32 and in bf16; the twin itself is checked against transformers.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8_models
import hf_models
from klotski import LLM, SamplingParams
from klotski.checkpoint import CheckpointError, SafetensorsIndex
from klotski.costs import ModelCosts
from klotski.model.quant import Fp8Weight, dequantize_fp8_block
from klotski.model.spec import ModelSpec, UnsupportedModelError
from klotski.model.weights import CheckpointWeights
from klotski.runtime.placement import ModelBytes

PROMPTS = hf_models.PROMPTS
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("shape,block", [((50, 70), (16, 24)), ((130, 260), (128, 128)), ((64, 64), (128, 128)),
                                         ((256, 128), (128, 128))])
def test_dequantize_fp8_block_matches_an_independent_reference(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    q, scale, ref = fp8_models.quantize_matrix(w, block)
    got = dequantize_fp8_block(q, scale, block)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert (got - w).abs().max() <= w.abs().max() * 2**-3  # e4m3: 3 mantissa bits
    out = torch.empty(shape, dtype=torch.bfloat16)
    dequantize_fp8_block(q, scale, block, out=out)
    assert torch.equal(out, ref.to(torch.bfloat16))  # rounded once from the fp32 product
    with pytest.raises(ValueError, match=r"needs scale shape \[\d+, \d+\], got \[1, 1, 1\]"):
        dequantize_fp8_block(q, scale.view(1, 1, -1)[:, :, :1], block)


def test_row_pieces_keep_their_own_partial_blocks():
    """w13 = gate (24 rows) + up (24 rows) with 16-row blocks: 2 + 2 scale rows, not 3 for 48 rows."""
    g = torch.Generator().manual_seed(1)
    block = (16, 24)
    parts = [fp8_models.quantize_matrix(torch.randn(24, 40, generator=g), block) for _ in range(2)]
    w = Fp8Weight(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), (24, 24), block)
    assert w.scale_inv.shape == (4, 2)
    assert torch.equal(w.dequantize(), torch.cat([p[2] for p in parts]))


CASES = {"v3-16x24": ("deepseek_v3", (16, 24), False, {}), "v3-128": ("deepseek_v3", (128, 128), False, {}),
         "v3-16x24-fused": ("deepseek_v3", (16, 24), True, {}),
         "v2-greedy-16x24": ("deepseek_v2", (16, 24), False, {"q_lora_rank": None, "topk_method": "greedy",
                                                               "n_group": 1, "topk_group": 1})}


@pytest.mark.parametrize("case", CASES)
def test_fp8_checkpoint_equals_its_dequantized_twin(fp8_checkpoints, case):
    arch, block, fused, overrides = CASES[case]
    fp8, deq, quantized = fp8_checkpoints.get(arch, block, fused=fused, **overrides)
    spec = ModelSpec.from_pretrained(fp8)
    assert spec.fp8_block == block and spec.weight_dtype == "float8_e4m3"
    assert any(".experts." in n for n in quantized) and any("self_attn" in n for n in quantized)
    assert SafetensorsIndex(fp8)[quantized[0]].dtype == torch.float8_e4m3fn
    for dtype in ("float32", "bfloat16"):
        a, b = LLM(fp8, device="cpu", dtype=dtype), LLM(deq, device="cpu", dtype=dtype)
        for x, y in zip(a.logits(PROMPTS), b.logits(PROMPTS)):
            assert torch.equal(x, y)
        ta = [o.token_ids for o in a.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        assert ta == [o.token_ids for o in b.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        moe = a.executor.layers[1]
        assert moe["w13"].dtype == getattr(torch, dtype)
        assert moe.get("router_bias", torch.empty(0)).dtype == torch.float32


@pytest.mark.parametrize("case", ["v3-16x24", "v3-16x24-fused"])
def test_dequantized_twin_matches_transformers(fp8_checkpoints, case):
    import transformers as tf

    arch, block, fused, overrides = CASES[case]
    _, deq, _ = fp8_checkpoints.get(arch, block, fused=fused, **overrides)
    hf = tf.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    hf_models.check_against_transformers(deq, hf, new_tokens=8)


def test_scales_are_applied(fp8_checkpoints):
    """Guard: the fp8 values alone (scales ignored) give other weights than the twin's."""
    fp8, deq, _ = fp8_checkpoints.get()
    w = CheckpointWeights(SafetensorsIndex(fp8), ModelSpec.from_pretrained(fp8))
    twin = CheckpointWeights(SafetensorsIndex(deq), ModelSpec.from_pretrained(deq))
    stored13, _ = w.read_expert_stored(1, 3)
    w13, w2 = w.read_expert(1, 3)
    assert isinstance(stored13, Fp8Weight) and stored13.rows == (24, 24)
    ref13, ref2 = twin.read_expert(1, 3)
    assert torch.equal(w13, ref13) and torch.equal(w2, ref2)
    assert not torch.equal(stored13.weight.float(), ref13)


def _copy(src, dst, config=None, edit=None):
    shutil.copytree(src, dst)
    if config is not None:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        config(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if edit is not None:
        file = os.path.join(dst, "model.safetensors")
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file)
    return dst


NAME = "model.layers.1.mlp.experts.2.down_proj.weight"


def test_fp8_weight_without_scale_is_refused(fp8_checkpoints, tmp_path):
    fp8, _, _ = fp8_checkpoints.get()
    path = _copy(fp8, tmp_path / "noscale", edit=lambda t: t.pop(NAME + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"tensor '{NAME}' in .* is fp8 but its block scale "
                                              rf"'{NAME}_scale_inv' is missing \(expected shape \[4, 1\]"):
        LLM(str(path), device="cpu")


def test_scale_with_wrong_shape_is_refused(fp8_checkpoints, tmp_path):
    fp8, _, _ = fp8_checkpoints.get()  # down_proj [64, 24], block (16, 24): scale [4, 1]
    path = _copy(fp8, tmp_path / "badscale", edit=lambda t: t.update({NAME + "_scale_inv": torch.ones(4, 2)}))
    with pytest.raises(CheckpointError, match=rf"block scale '{NAME}_scale_inv' in .* of \[64, 24\] weight "
                                              rf"'{NAME}' \(weight_block_size \[16, 24\]\): expected shape \[4, 1\], "
                                              rf"got \[4, 2\]"):
        LLM(str(path), device="cpu")


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 8}, "awq bits 8 is not supported; supported 4-bit checkpoints: gptq .* "
                                         r"\(and fp8 block-scaled, quant_method 'fp8'\)"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [16, 24]}, "fp8 fmt 'e5m2' is not supported"),
    ({"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size must be two positive ints .* got None"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size must be two positive ints .* got \[128\]"),
    ({"quant_method": "fp8", "weight_block_size": [16, 24], "activation_scheme": "static"},
     "activation_scheme 'static' is not supported"),
])
def test_unsupported_quantization_configs_are_refused(fp8_checkpoints, tmp_path, qc, match):
    fp8, _, _ = fp8_checkpoints.get()
    path = _copy(fp8, tmp_path / "q", config=lambda c: c.update(quantization_config=qc))
    with pytest.raises(UnsupportedModelError, match=match):
        LLM(str(path), device="cpu")


def test_fp8_tensors_need_a_quantization_config(fp8_checkpoints, tmp_path):
    fp8, deq, _ = fp8_checkpoints.get()
    path = _copy(fp8, tmp_path / "noconfig", config=lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match=r"72 tensor\(s\) stored as fp8 \(e.g. 'model.layers.0.self_attn.q_a_proj"
                                              r".weight' in .*\) but config.json declares no fp8 quantization_config"):
        LLM(str(path), device="cpu")
    stray = _copy(deq, tmp_path / "stray", edit=lambda t: t.update({NAME + "_scale_inv": torch.ones(4, 1)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{NAME}_scale_inv' in .* is an fp8 block scale but "
                                              r"config.json declares no quantization_config"):
        LLM(str(stray), device="cpu")


@pytest.mark.parametrize("block", [(16, 24), (128, 128)])
def test_costs_price_stored_fp8_bytes_as_the_checkpoint_holds_them(fp8_checkpoints, block):
    """The planner's stored bytes per class (1 byte per fp8 weight + 4 per block scale; norms, router,
    embeddings in the config dtype) equal what the checkpoint files hold."""
    fp8, _, _ = fp8_checkpoints.get(block=block)
    spec = ModelSpec.from_pretrained(fp8)
    costs = ModelCosts.from_spec(spec, weight_dtype=spec.weight_dtype)
    mb = ModelBytes.of(CheckpointWeights(SafetensorsIndex(fp8), spec), torch.bfloat16)
    for lc, stored in zip(costs.layers, mb.per_layer_ckpt):
        assert (lc.attn_bytes, lc.shared_bytes, lc.norm_bytes) == (stored["attn"], stored["shared"], stored["norm"])
        # the tiny checkpoint stores e_score_correction_bias in bf16; real V3 (and the cost model) in fp32
        assert stored["gate"] <= lc.gate_bytes <= stored["gate"] + 2 * spec.num_experts
        if lc.kind == "moe":
            assert lc.expert_bytes == mb.expert_ckpt
    index = SafetensorsIndex(fp8)
    assert costs.embed_bytes == index["model.embed_tokens.weight"].nbytes
    assert mb.expert_ckpt < mb.expert / 1.9  # fp8 + scales: about half of bf16
