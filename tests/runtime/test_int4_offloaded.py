"""Offloaded runs over int4 experts (``quantization="int4"``) give the resident engine's greedy tokens and
logits (1e-4 relative, fp32 compute) over the same weights dequantized, under budgets that force a disk tier,
for every supported architecture; the experts stay int4 on every tier."""
import pytest
import torch

import hf_models
import int4_models
from klotski import LLM, SamplingParams
from klotski.quant import Int4Weight
from klotski.store import ExpertStore, convert_checkpoint

PROMPTS = hf_models.PROMPTS
SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# (arch, checkpoint options, symmetric, policy): group size 8 gives 3 to 8 groups per row (odd counts too)
CASES = [("mixtral", {}, False, "klotski"), ("qwen2_moe", {"fused": True}, True, "klotski"),
         ("qwen3_moe", {}, False, "flexgen"), ("olmoe", {"dtype": "bfloat16"}, True, "klotski"),
         ("deepseek_v2", {}, False, "layerwise"), ("deepseek_v3", {}, True, "klotski")]


def resident_reference(path, store, tmp_path):
    deq = int4_models.dequantized_checkpoint(path, str(store), str(tmp_path / "deq"))
    ref = LLM(deq, device="cpu", dtype="float32")
    tokens = [o.token_ids for o in ref.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return tokens, ref.logits(PROMPTS)


@pytest.mark.parametrize("arch,ckpt,symmetric,policy", CASES, ids=[c[0] for c in CASES])
def test_int4_offloaded_matches_resident_over_dequantized(checkpoints, tmp_path, arch, ckpt, symmetric, policy):
    path, _ = checkpoints.get(arch, **ckpt)
    store = tmp_path / "store"
    manifest = convert_checkpoint(path, store, quantize="int4", group_size=8, symmetric=symmetric)
    assert manifest["quantization"]["group_size"] == 8 and manifest["quantization"]["symmetric"] == symmetric
    ref_tokens, ref_logits = resident_reference(path, store, tmp_path)
    gpu, cpu = int4_models.tight_budgets(path, policy, str(store))
    llm = LLM(path, device="cpu", dtype="float32", policy=policy, gpu_memory=gpu, cpu_memory=cpu,
              offload_dir=str(store), num_batches=2, batch_size=2, quantization="int4")
    try:
        tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        m = llm.metrics.extra
        kv_staging = llm.executor.gpu.items.get("kv staging", 0)
        logits = llm.logits(PROMPTS)
        w = llm.executor.w
    finally:
        llm.close()
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits):
        assert hf_models.rel_err(ours, ref) < 1e-4
    assert m["bytes_disk_read"] > 0 and m["weights_per_tier"]["disk"] > 0
    # the executor sizes host-KV staging buffers on demand, unchecked (check=False): at budgets this tight
    # they can pass the planner's estimate by a few KiB whatever the expert format, so they are set apart
    assert m["peak_gpu_bytes"] - kv_staging <= gpu and m["peak_cpu_bytes"] <= cpu
    # int4 everywhere: the device pool, and the store records the disk tier reads
    assert isinstance(w.pool.w13, Int4Weight) and w.pool.w13.symmetric == symmetric
    spec = w.spec
    full = 3 * spec.hidden_size * spec.moe_intermediate_size * 4  # one fp32 expert
    homes = [w.expert_home[(layer, e)] for layer in spec.moe_layers for e in range(spec.num_experts)]
    assert any(t == "store" for t, _ in homes)
    for tier, what in homes:
        if tier == "store":
            assert what.group_size == 8 and what.nbytes < full / 3  # fp32 scales per 8 weights: 1.1 bytes a weight


def test_int4_host_tier_and_planner_prices_stored_bytes(checkpoints, tmp_path):
    """With room in host memory the int4 experts are held there as stored; the plan prices an expert at its
    int4 bytes, so more experts fit a device budget than in fp32. Cold experts are not computed from int4 host
    copies: with host compute "experts=auto" the plan, like the executor, runs them "off"."""
    path, _ = checkpoints.get("mixtral")
    store = tmp_path / "store"
    convert_checkpoint(path, store, quantize="int4", group_size=16)
    gpu, cpu = int4_models.tight_budgets(path, "klotski", str(store))
    llm = LLM(path, device="cpu", dtype="float32", policy="klotski", gpu_memory=gpu, cpu_memory=4 * cpu,
              offload_dir=str(store), num_batches=2, batch_size=2, quantization="int4", host_compute="experts=auto")
    assert llm.executor.plan.host.experts == llm.executor.host.experts == "off"
    w, costs = llm.executor.w, llm.executor.costs
    homes = [w.expert_home[(layer, e)] for layer in w.spec.moe_layers for e in range(w.spec.num_experts)]
    llm.close()
    cpu_homes = [what for tier, what in homes if tier == "cpu"]
    assert cpu_homes and all(isinstance(x[0], Int4Weight) for x in cpu_homes)
    rec = ExpertStore(store).expert(0, 0)
    assert costs.layers[0].expert_bytes == sum(t.nbytes for t in rec.tensors) < 3 * 64 * 48 * 4 / 4
    assert costs.device_bytes(costs.layers[0].expert_bytes, expert=True) == costs.layers[0].expert_bytes


def test_int4_refusals(checkpoints, tmp_path):
    path, _ = checkpoints.get("mixtral")
    with pytest.raises(ValueError, match="needs an offload_dir"):
        LLM(path, device="cpu", policy="klotski", gpu_memory="1MiB", cpu_memory="1MiB", quantization="int4")
    with pytest.raises(ValueError, match="needs an offloaded policy"):
        LLM(path, device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        LLM(path, device="cpu", policy="klotski", offload_dir=str(tmp_path / "a"), quantization="int3")
    plain = tmp_path / "plain"
    convert_checkpoint(path, plain)
    with pytest.raises(ValueError, match="not int4"):
        LLM(path, device="cpu", policy="klotski", offload_dir=str(plain), quantization="int4")
    q = tmp_path / "q"
    convert_checkpoint(path, q, quantize="int4", group_size=16)
    with pytest.raises(ValueError, match="holds int4 experts"):
        LLM(path, device="cpu", policy="layerwise", gpu_memory="700KiB", cpu_memory="200KiB", offload_dir=str(q))
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        convert_checkpoint(path, tmp_path / "bad", quantize="int4", group_size=32)


def test_int4_store_converted_on_first_use(checkpoints, tmp_path):
    path, _ = checkpoints.get("qwen3_moe")
    off = tmp_path / "off"
    llm = LLM(path, device="cpu", dtype="float32", policy="klotski", gpu_memory=None, cpu_memory=None,
              offload_dir=str(off), quantization="int4")
    out = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=SP)
    llm.close()
    q = ExpertStore(off).int4
    assert q["group_size"] == 8 and len(out[0].token_ids) == SP.max_tokens  # H=64, I=40: largest pow2 dividing both
    w13, w2 = ExpertStore(off).read_expert(0, 0, verify=True)
    assert isinstance(w13, Int4Weight) and w13.shape == (80, 64) and w2.shape == (64, 40)
    assert torch.isfinite(w13.dequantize()).all()
