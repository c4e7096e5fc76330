"""DeepSeek-V2/V3 config parsing: the public configs of the real checkpoints, rope/yarn, validation errors."""
import math

import pytest
import torch

from klotski.model import ModelSpec, UnsupportedModelError
from klotski.model.decoder import make_rotary
from klotski.model.mla import softmax_scale

# deepseek-ai/DeepSeek-V2-Lite config.json (auto_map and training-only fields aside, as published)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}

# deepseek-ai/DeepSeek-V3 config.json
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v2_lite():
    s = ModelSpec.from_config(V2_LITE)
    assert s.attention == "mla" and s.num_layers == 27 and s.num_heads == s.num_kv_heads == 16
    assert s.layer_kinds == ("dense",) + ("moe",) * 26
    assert (s.num_experts, s.top_k, s.moe_intermediate_size, s.intermediate_size) == (64, 6, 1408, 10944)
    assert (s.num_shared_experts, s.shared_expert_intermediate_size) == (2, 2816)
    assert (s.q_lora_rank, s.kv_lora_rank, s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim) == (0, 512, 128, 64, 128)
    assert s.q_head_dim == 192
    assert (s.router_scoring, s.topk_method, s.norm_topk_prob, s.routed_scaling_factor) == ("softmax", "greedy", False, 1.0)
    assert not s.router_bias
    assert s.rope.rope_type == "yarn" and s.rope.factor == 40 and s.rope.interleaved
    # 576 cached elements per token and layer (vs 2*16*192... expanded): 31104 bytes per token in bf16
    assert s.kv_cache_elems_per_token() == 576
    assert s.kv_cache_elems_per_token() * 2 * s.num_layers == 31104
    # softmax scale: 192^-0.5 * (0.1*0.707*ln 40 + 1)^2
    assert softmax_scale(s) == pytest.approx(192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, rel=1e-12)


def test_deepseek_v3():
    s = ModelSpec.from_config(V3)
    assert s.layer_kinds == ("dense",) * 3 + ("moe",) * 58 and s.num_layers == 61
    assert (s.num_experts, s.top_k, s.n_group, s.topk_group) == (256, 8, 8, 4)
    assert (s.router_scoring, s.topk_method, s.norm_topk_prob, s.router_bias) == ("sigmoid", "noaux_tc", True, True)
    assert s.routed_scaling_factor == 2.5
    assert (s.num_shared_experts, s.shared_expert_intermediate_size) == (1, 2048)
    assert (s.q_lora_rank, s.kv_lora_rank) == (1536, 512)
    assert s.rope.interleaved  # absent from config.json: transformers' default (true) applies
    assert s.kv_cache_elems_per_token() * 2 * s.num_layers == 70272
    assert s.torch_dtype == "bfloat16" and s.eos_token_ids == (1,)


def test_builtin_presets_parse_with_the_same_parser():
    from klotski import presets

    for name, real in [("deepseek-v2-lite", V2_LITE), ("deepseek-v3", V3)]:
        assert name in presets.MODEL_CONFIGS
        assert ModelSpec.from_config(presets.MODEL_CONFIGS[name]) == ModelSpec.from_config(real)


@pytest.mark.parametrize("real", [V2_LITE, V3], ids=["v2-lite", "v3"])
def test_yarn_and_softmax_scale_match_transformers(real):
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    cls = tf.DeepseekV2Config if real["model_type"] == "deepseek_v2" else tf.DeepseekV3Config
    keep = {k: v for k, v in real.items() if k not in ("architectures", "auto_map", "transformers_version")}
    cfg = cls(**keep)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    spec = ModelSpec.from_config(real)
    rotary = make_rotary(spec)
    assert torch.equal(rotary.inv_freq, inv_freq)
    assert rotary.attention_scaling == attention_factor
    assert softmax_scale(spec) == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 192**-0.5), rel=1e-12)


@pytest.mark.parametrize("extra", [
    dict(factor=8.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.8),
    dict(factor=4.0, original_max_position_embeddings=64),
    dict(factor=4.0, original_max_position_embeddings=64, truncate=False, beta_fast=16, beta_slow=2),
    dict(factor=4.0, original_max_position_embeddings=64, attention_factor=1.3),
])
def test_yarn_variants_match_transformers(extra):
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tf.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                              q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=32, v_head_dim=16,
                              max_position_embeddings=256, n_routed_experts=8, n_group=1, topk_group=1,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **extra})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    rotary = make_rotary(ModelSpec.from_config(cfg.to_dict()))
    assert torch.equal(rotary.inv_freq, inv_freq) and rotary.attention_scaling == pytest.approx(attention_factor)


def test_moe_layer_freq_and_dense_only():
    s = ModelSpec.from_config({**V2_LITE, "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert s.layer_kinds == ("dense", "dense", "moe", "dense", "moe", "dense")
    dense = ModelSpec.from_config({**V2_LITE, "n_routed_experts": None})
    assert dense.moe_layers == [] and dense.num_experts == 0


def test_v2_group_limited_greedy_and_yarn_factor_default():
    s = ModelSpec.from_config({**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3})
    assert (s.topk_method, s.n_group, s.topk_group) == ("group_limited_greedy", 8, 3)
    no_factor = {**V3, "rope_scaling": {k: v for k, v in V3["rope_scaling"].items() if k != "factor"}}
    assert ModelSpec.from_config(no_factor).rope.factor == 163840 / 4096
    assert not ModelSpec.from_config({**V3, "rope_interleave": False}).rope.interleaved


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"n_group": 3}, "divisible by n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"n_group": 256, "topk_group": 8}, "at least 2"),
    ({"topk_group": 1, "num_experts_per_tok": 40}, "exceeds"),
    ({"qk_rope_head_dim": 63}, "even"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
])
def test_bad_v3_configs_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_config({**V3, **change})


def test_unsupported_router_settings():
    with pytest.raises(UnsupportedModelError, match="noaux_tc"):
        ModelSpec.from_config({**V2_LITE, "topk_method": "noaux_tc"})
    with pytest.raises(UnsupportedModelError, match="scoring_func"):
        ModelSpec.from_config({**V2_LITE, "scoring_func": "sigmoid"})
    with pytest.raises(UnsupportedModelError, match="scoring_func"):
        ModelSpec.from_config({**V3, "scoring_func": "softmax"})


@pytest.mark.parametrize("real", [V2_LITE, V3], ids=["v2-lite", "v3"])
def test_cost_model_counts_the_mla_tensors_the_loader_reads(real):
    """The planner's attention parameters per layer equal the elements of the MLA weight table."""
    from klotski import costs
    from klotski.model.names import mla_sources

    spec = ModelSpec.from_config(real)
    table = sum(math.prod(shape) for src in mla_sources(spec, "p").values() for shape in src.shapes)
    assert costs.ModelCosts.from_spec(spec).layers[0].attn_params == table
    per_token = costs.ModelCosts.from_spec(spec).kv_bytes(1)
    assert per_token == spec.kv_cache_elems_per_token() * 2 * spec.num_layers  # bf16 latent + rope key
