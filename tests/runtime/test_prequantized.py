"""Pre-quantized 4-bit checkpoints (GPTQ v1 / v2, AWQ GEMM, compressed-tensors pack-quantized W4A16), written
by an independent float64 packer (tests/int4_checkpoints.py), load end to end: offloaded under budgets that
force a disk tier, they give the resident engine's greedy tokens and logits (1e-4 relative, fp32) over the
same model with every quantized layer dequantized; experts stay int4 on every tier as the checkpoint stored
them, and the other quantized layers (attention, dense MLPs, shared experts) are dequantized at load."""
import json
import math
import os

import pytest
import torch

import hf_models
import int4_checkpoints
import int4_models
from klotski import LLM, SamplingParams
from klotski.checkpoint import CheckpointError
from klotski.model import UnsupportedModelError
from klotski.quant import Int4Weight
from klotski.store import ExpertStore, convert_checkpoint

PROMPTS = hf_models.PROMPTS
SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# (arch, format, group, symmetric, gptq_v2, policy): every format, both symmetries, GPTQ's two zero-point
# conventions, a per-channel checkpoint (group -1: regrouped in the store), every architecture family
CASES = [("mixtral", "gptq", 16, False, False, "klotski"), ("qwen2_moe", "gptq", 8, True, True, "klotski"),
         ("olmoe", "gptq", -1, False, False, "flexgen"), ("deepseek_v3", "awq", 8, False, False, "klotski"),
         ("qwen3_moe", "compressed-tensors", 8, False, False, "layerwise"),
         ("deepseek_v2", "compressed-tensors", 8, True, False, "klotski")]


@pytest.fixture
def prequantized(checkpoints, tmp_path):
    def make(arch, method, group, symmetric, v2=False):
        path, _ = checkpoints.get(arch)
        q, ref = str(tmp_path / "q"), str(tmp_path / "ref")
        layers = int4_checkpoints.write_prequantized(path, q, ref, method, group, symmetric, v2)
        return q, ref, layers
    return make


def run(path, **kw):
    """(placed weights of an offloaded run or None, greedy tokens, logits, metrics)."""
    llm = LLM(path, device="cpu", dtype="float32", **kw)
    try:
        tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        return getattr(llm.executor, "w", None), tokens, llm.logits(PROMPTS), dict(llm.metrics.extra)
    finally:
        llm.close()


@pytest.mark.parametrize("arch,method,group,symmetric,v2,policy", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{'-sym' if c[3] else ''}{'-v2' if c[4] else ''}" for c in CASES])
def test_prequantized_offloaded_matches_resident_over_dequantized(prequantized, tmp_path, arch, method, group,
                                                                  symmetric, v2, policy):
    q, ref, layers = prequantized(arch, method, group, symmetric, v2)
    assert any("experts" in n for n in layers) and any("self_attn" in n for n in layers)
    _, ref_tokens, ref_logits, _ = run(ref)
    # resident over the 4-bit checkpoint: every quantized layer dequantized at load
    _, tokens, logits, _ = run(q)
    assert tokens == ref_tokens
    assert all(hf_models.rel_err(a, b) < 1e-4 for a, b in zip(logits, ref_logits))
    store = str(tmp_path / "store")
    gpu, cpu = int4_models.tight_budgets(q, policy, store)
    w, tokens, logits, m = run(q, policy=policy, gpu_memory=gpu, cpu_memory=cpu, offload_dir=store,
                                 num_batches=2, batch_size=2)
    assert tokens == ref_tokens
    assert all(hf_models.rel_err(a, b) < 1e-4 for a, b in zip(logits, ref_logits))
    assert m["bytes_disk_read"] > 0 and m["weights_per_tier"]["disk"] > 0
    assert isinstance(w.pool.w13, Int4Weight) and w.pool.w13.symmetric == symmetric
    assert any(t == "store" for t, _ in w.expert_home.values())
    # the store holds the checkpoint's own codes: its experts dequantize to the reference's experts
    manifest = ExpertStore(store).manifest
    assert manifest["quantization"]["source"] == "checkpoint:" + method + ("_v2" if v2 else "")
    # per-channel (group -1): regrouped exactly to the common divisor of the two rows' lengths
    per_channel = math.gcd(w.spec.hidden_size, w.spec.moe_intermediate_size)
    assert manifest["quantization"]["group_size"] == (per_channel if group == -1 else group)
    # quantized non-expert layers streamed from the host or disk tier are plain tensors read from the
    # store's non-expert file (dequantized there at conversion), never the checkpoint's packed codes
    non_expert = ExpertStore(store).non_expert_path
    streamed = [info for layer in w.disk for infos in layer.values() for info in infos if info.name in layers]
    assert streamed and all(info.path == non_expert and info.int4 is None for info in streamed)


def test_prequantized_store_holds_checkpoint_codes(prequantized, tmp_path):
    """`klotski convert` of a GPTQ checkpoint (no --quantize needed) stores its codes as they are: each expert
    dequantizes exactly to the float64 reference's values; a second LLM reuses the store."""
    from klotski.model.spec import ModelSpec
    from klotski.model.weights import CheckpointWeights, detect_layout
    from klotski.checkpoint import SafetensorsIndex
    from klotski.model.names import expert_names

    q, ref, _ = prequantized("mixtral", "gptq", 16, False)
    store = tmp_path / "store"
    manifest = convert_checkpoint(q, store)
    assert manifest["quantization"] == {"method": "int4", "bits": 4, "group_size": 16, "symmetric": False,
                                        "scale_dtype": "float16", "source": "checkpoint:gptq"}
    ref_w = CheckpointWeights(SafetensorsIndex(ref), ModelSpec.from_pretrained(ref))
    s = ExpertStore(store)
    for layer in ref_w.spec.moe_layers:
        for e in range(ref_w.spec.num_experts):
            w13, w2 = s.read_expert(layer, e, verify=True)
            r13, r2 = ref_w.read_expert(layer, e)
            assert torch.equal(w13.dequantize(), r13) and torch.equal(w2.dequantize(), r2)
    mtime = os.path.getmtime(store / "manifest.json")
    gpu, cpu = int4_models.tight_budgets(q, "klotski", str(store))  # offloaded LLMs over this store
    assert os.path.getmtime(store / "manifest.json") == mtime  # converted once
    # room in host memory: quantized attention held there dequantized, as the reference's values
    llm = LLM(q, device="cpu", dtype="float32", policy="klotski", gpu_memory=gpu, cpu_memory=8 * cpu,
              offload_dir=str(store), num_batches=2, batch_size=2)
    host = dict(llm.executor.w.host[0])
    llm.close()
    assert "q" in host and torch.equal(host["q"], ref_w.read_layer(0)["q"])


def _with_config(src: str, dst, change) -> str:
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    change(config["quantization_config"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("change,match", [
    (lambda qc: qc.update(desc_act=True), "gptq desc_act true"),
    (lambda qc: qc.update(bits=8), "gptq bits 8"),
    (lambda qc: qc.update(bits=3), "gptq bits 3"),
    (lambda qc: qc.update(quant_method="hqq"), "quant_method 'hqq'"),
    (lambda qc: qc.update(quant_method="bitsandbytes"), "quant_method 'bitsandbytes'"),
])
def test_unsupported_settings_refused_by_name(prequantized, tmp_path, change, match):
    q, _, _ = prequantized("mixtral", "gptq", 16, False)
    path = _with_config(q, tmp_path / "bad", change)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        LLM(path, device="cpu")
    assert "supported 4-bit checkpoints: gptq (bits 4, desc_act false" in str(e.value)
    assert "awq" in str(e.value) and "compressed-tensors" in str(e.value)


def test_bad_layouts_refused_by_name(prequantized, tmp_path):
    from safetensors.torch import load_file, save_file

    q, _, _ = prequantized("mixtral", "gptq", 16, False)
    # a config whose group size does not match the stored scales
    path = _with_config(q, tmp_path / "group", lambda qc: qc.update(group_size=32))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.scales' .* expected shape "
                                              r"\[2, 64\], got \[4, 64\]"):
        LLM(path, device="cpu")
    # an act-order g_idx in a desc_act false checkpoint: refused when the layer is read
    bad = tmp_path / "gidx"
    _with_config(q, bad, lambda qc: None)
    t = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    t[name] = t[name].flip(0).contiguous()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight \(gptq tensors .*act-order"):
        LLM(str(bad), device="cpu")
    # the offloaded path needs an offload_dir for the int4 store
    with pytest.raises(ValueError, match="pre-quantized gptq checkpoint needs an offload_dir"):
        LLM(q, device="cpu", policy="klotski", gpu_memory="64MiB", cpu_memory="64MiB")


def test_cli_convert_and_generate(prequantized, tmp_path, capsys):
    """`klotski convert` and `klotski generate` take a pre-quantized checkpoint as they are."""
    from klotski.cli import main

    q, _, _ = prequantized("qwen3_moe", "compressed-tensors", 8, True)
    hf_models.write_tokenizer(q)
    store = str(tmp_path / "store")
    assert main(["convert", q, store, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "int4 experts (group 8, symmetric) from checkpoint:compressed-tensors" in out and "checksums match" in out
    assert main(["generate", "--model", q, "--prompt", "ab", "--policy", "klotski", "--gpu-memory", "2MiB",
                 "--cpu-memory", "2MiB", "--offload-dir", store, "--max-tokens", "4"]) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prequantized_on_cuda(prequantized, tmp_path):
    """On a GPU the checkpoint's int4 experts run through the Triton int4 kernels (fp32 compute): the greedy
    tokens of the resident engine over the dequantized weights on the same GPU."""
    q, ref, _ = prequantized("mixtral", "gptq", 16, False)
    llm = LLM(ref, device="cuda", dtype="float32")
    want = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    llm.close()
    llm = LLM(q, device="cuda", dtype="float32", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB",
              offload_dir=str(tmp_path / "store"), num_batches=2, batch_size=2)
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        assert isinstance(llm.executor.w.pool.w13, Int4Weight)
    finally:
        llm.close()
    assert got == want


def test_offloaded_experts_refuse_4bit_experts(prequantized, tmp_path):
    """klotski.experts.OffloadedExperts computes in the model's dtype: a 4-bit checkpoint's experts (read raw
    from the checkpoint, or from an int4 store) are refused by name, never read as the wrong bytes."""
    from klotski.experts import OffloadedExperts

    q, _, _ = prequantized("mixtral", "awq", 16, False)
    with pytest.raises(ValueError, match="pre-quantized awq checkpoint's 4-bit experts are not supported"):
        OffloadedExperts.from_checkpoint(q, 0, gpu_memory="64MiB", cpu_memory="64MiB")
    with pytest.raises(ValueError, match="pre-quantized awq checkpoint's 4-bit experts are not supported"):
        OffloadedExperts.from_checkpoint(q, 0, gpu_memory="64MiB", cpu_memory="64MiB", offload_dir=str(tmp_path / "s"))
    # an int4 store (here converted from the 4-bit checkpoint) is refused by StoreExperts as well
    from klotski.experts.source import StoreExperts

    convert_checkpoint(q, tmp_path / "store")
    with pytest.raises(ValueError, match="holds int4 experts, which OffloadedExperts does not support"):
        StoreExperts(ExpertStore(tmp_path / "store"), 0, 48, 64)
