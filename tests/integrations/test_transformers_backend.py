"""transformers + Klotski's offloaded experts vs transformers' own eager experts, on tiny random checkpoints of
every supported architecture, under budgets that leave fewer device slots than experts and a disk tier."""
import pytest
import torch

import hf_models
from klotski.integrations import transformers as kt
from klotski.runtime.memory import BudgetError

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
PROMPTS = hf_models.PROMPTS
NEW_TOKENS = 16


def expert_bytes(hf) -> tuple[int, int, int]:
    """(fp32 bytes of one expert, MoE layers, experts per layer) of transformers model ``hf``."""
    found = kt.experts_modules(hf)
    m = found[0][2]
    return 3 * m.intermediate_dim * m.hidden_dim * 4, len(found), m.num_experts


def budgets(hf, slots: int = 2, host: int = 1) -> dict:
    """``slots`` device slots and ``host`` host-resident experts per MoE layer (plus the staging ring)."""
    eb, layers, _ = expert_bytes(hf)
    return dict(gpu_memory=layers * slots * eb, cpu_memory=2 * (eb + 3 * 8192) + layers * host * eb)


def check_tiers(model, hf, slots: int = 2, host: int = 1) -> None:
    _, layers, num_experts = expert_bytes(hf)
    group = model.klotski_group
    assert len(group.modules) == layers
    for m in group.modules:
        assert m.num_slots == slots < num_experts
        assert len(m.host) == host and num_experts - len(m.host) > 0  # a disk tier


def compare(model, hf, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> None:
    """Logits within 1e-5 relative (fp32) and identical greedy tokens, prompt by prompt."""
    for prompt in prompts:
        ours, ref = hf_models.hf_logits(model, prompt), hf_models.hf_logits(hf, prompt)
        assert ours.shape == ref.shape
        assert hf_models.rel_err(ours, ref) < 1e-5
    for prompt in prompts:
        assert hf_models.hf_greedy(model, prompt, new_tokens) == hf_models.hf_greedy(hf, prompt, new_tokens)


def batched_greedy(model, prompts, new_tokens: int) -> list[list[int]]:
    """``generate(do_sample=False)`` on one left-padded batch (decode steps route several tokens at once)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_transformers(checkpoints, arch):
    path, hf = checkpoints.get(arch)
    model = kt.load_model(path, dtype=torch.float32, **budgets(hf))
    try:
        check_tiers(model, hf)
        assert all(p.device.type != "meta" for p in model.parameters())  # every non-expert weight loaded
        assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n, _ in model.named_parameters())
        assert model.config._experts_implementation == kt.IMPLEMENTATION
        compare(model, hf)
        assert batched_greedy(model, PROMPTS, 8) == batched_greedy(hf, PROMPTS, 8)
        stats = model.klotski_group.stats()
        assert stats["disk_bytes"] > 0 and stats["host_bytes"] > 0 and stats["hits"] > 0
    finally:
        model.klotski_group.close()


def test_packed_store_and_fused_checkpoint(checkpoints, tmp_path):
    path, hf = checkpoints.get("qwen3_moe", fused=True)
    model = kt.load_model(path, dtype=torch.float32, offload_dir=str(tmp_path / "store"), **budgets(hf))
    try:
        assert (tmp_path / "store" / "manifest.json").is_file()
        assert type(model.klotski_group.modules[0].source).__name__ == "StoreExperts"
        compare(model, hf, PROMPTS[-1:], 8)
    finally:
        model.klotski_group.close()


def test_offload_experts_on_a_loaded_model_frees_its_expert_weights(checkpoints):
    import transformers as tf

    path, hf = checkpoints.get("mixtral")
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    group = kt.offload_experts(model, path, **budgets(hf))
    try:
        assert group is model.klotski_group
        names = [n for n, _ in model.named_parameters()] + list(model.state_dict())
        assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n in names)
        compare(model, hf, PROMPTS[-1:], 8)
        with pytest.raises(ValueError, match="already runs on Klotski"):
            kt.offload_experts(model, path, **budgets(hf))
    finally:
        group.close()


def _no_hook_on_experts(model) -> None:
    for name, _, module in kt.experts_modules(model):
        for sub_name, sub in module.named_modules():
            assert not hasattr(sub, "_hf_hook"), f"accelerate hook on {name}.{sub_name}"


def test_no_accelerate_hook_on_experts_with_a_disk_device_map(checkpoints, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate (the project's `bench` extra) is not installed")
    import transformers as tf

    path, hf = checkpoints.get("qwen2_moe")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    # plain transformers + accelerate: the disk-offloaded experts modules carry hooks that load all E experts
    plain = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map,
                                                    offload_folder=str(tmp_path / "acc")).eval()
    hooked = [n for n, _, m in kt.experts_modules(plain) if hasattr(m, "_hf_hook")]
    assert hooked  # the situation the integration must undo
    group = kt.offload_experts(plain, path, **budgets(hf))
    try:
        _no_hook_on_experts(plain)
        compare(plain, hf, PROMPTS[-1:], 8)
    finally:
        group.close()
    model = kt.load_model(path, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "acc2"),
                          **budgets(hf))
    try:
        assert any(hasattr(m, "_hf_hook") for m in model.modules())  # accelerate does offload the rest
        _no_hook_on_experts(model)
        compare(model, hf, PROMPTS[-1:], 8)
    finally:
        model.klotski_group.close()


def test_bytes_read_per_forward_are_the_routed_non_resident_experts(checkpoints):
    path, hf = checkpoints.get("olmoe")
    model = kt.load_model(path, dtype=torch.float32, prefetch=False, **budgets(hf, slots=3, host=2))
    group = model.klotski_group
    seen = []

    def before(module, args):
        ids = args[1]
        seen.append((module, set(ids.unique().tolist()), set(module.resident)))

    handles = [m.register_forward_pre_hook(before) for m in group.modules]
    try:
        for prompt in PROMPTS:
            seen.clear()
            hf_models.hf_greedy(model, prompt, 4)
            for module, routed, resident in seen[-len(group.modules):]:  # the last decode step's forwards
                cold = routed - resident
                host = {e for e in cold if e in module.host}
                got = module.last_forward
                assert got["disk_bytes"] == sum(module.expert_nbytes(e) for e in cold - host)
                assert got["host_bytes"] == sum(module.expert_nbytes(e) for e in host)
                assert got["loads"] == len(cold) and got["hits"] == len(routed & resident)
                assert got["prefetch_loads"] == 0
        total = group.stats()
        assert total["disk_bytes"] > 0
    finally:
        for h in handles:
            h.remove()
        group.close()


def test_unsupported_experts_class_is_refused_by_name(checkpoints, tmp_path):
    import transformers as tf

    cfg = tf.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(kt.UnsupportedExpertsError, match="GptOssExperts.*biases.*transposed"):
        kt.offload_experts(model, str(tmp_path), gpu_memory="1GiB", cpu_memory="1GiB")
    model.save_pretrained(tmp_path / "gpt_oss")
    with pytest.raises(kt.UnsupportedExpertsError, match="GptOssExperts"):
        kt.load_model(str(tmp_path / "gpt_oss"), gpu_memory="1GiB", cpu_memory="1GiB")


def test_budget_below_one_slot_per_layer_names_the_minimum(checkpoints):
    path, hf = checkpoints.get("mixtral")
    eb, layers, _ = expert_bytes(hf)
    with pytest.raises(BudgetError, match="at least"):
        kt.load_model(path, dtype=torch.float32, gpu_memory=eb, cpu_memory="1MiB")


def test_klotski_implementation_without_offloaded_experts_says_what_to_do(checkpoints):
    import transformers as tf

    kt.register()
    path, _ = checkpoints.get("mixtral")
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="klotski")
    with pytest.raises(RuntimeError, match="offload_experts"):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("fused", [False, True])
def test_load_model_never_materialises_expert_tensors(checkpoints, monkeypatch, fused):
    """transformers materialises every checkpoint tensor it loads through ``spawn_materialize``: load_model must
    call it for the non-expert tensors only."""
    import re

    import transformers.core_model_loading as cml

    from klotski.checkpoint import SafetensorsIndex

    path, hf = checkpoints.get("deepseek_v3", fused=fused)
    calls = []
    real = cml.spawn_materialize

    def counting(thread_pool, tensor, *args, **kwargs):
        calls.append(tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape))
        return real(thread_pool, tensor, *args, **kwargs)

    monkeypatch.setattr(cml, "spawn_materialize", counting)
    names = SafetensorsIndex(path).names()
    experts = [n for n in names if re.search(kt.EXPERT_KEYS, n)]
    assert experts  # the checkpoint does hold expert tensors
    model = kt.load_model(path, dtype=torch.float32, **budgets(hf))
    model.klotski_group.close()
    assert len(calls) == len(names) - len(experts)
