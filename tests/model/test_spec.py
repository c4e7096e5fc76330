import pytest

from klotski.model import ModelSpec


def test_qwen2_moe_sparse_step_and_mlp_only_layers():
    cfg = dict(model_type="qwen2_moe", vocab_size=10, hidden_size=8, num_hidden_layers=6, num_attention_heads=2,
               moe_intermediate_size=4, intermediate_size=16, shared_expert_intermediate_size=8, num_experts=4,
               decoder_sparse_step=2, mlp_only_layers=[3])
    spec = ModelSpec.from_config(cfg)
    assert spec.layer_kinds == ("dense", "moe", "dense", "dense", "dense", "moe")
    assert spec.attention_bias and spec.shared_expert_gate and spec.num_kv_heads == 2


def test_legacy_rope_fields_and_head_dim():
    cfg = dict(model_type="mixtral", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=16, rope_theta=1e6,
               rope_scaling={"type": "linear", "factor": 2.0})
    spec = ModelSpec.from_config(cfg)
    assert spec.rope.theta == 1e6 and spec.rope.rope_type == "linear" and spec.rope.factor == 2.0
    assert spec.head_dim == 16 and spec.kv_cache_elems_per_token() == 2 * 2 * 16


def test_missing_required_field_is_named():
    with pytest.raises(ValueError, match="missing required field 'hidden_size'"):
        ModelSpec.from_config(dict(model_type="olmoe", vocab_size=10))


def test_unsupported_rope_type():
    cfg = dict(model_type="olmoe", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=4, rope_scaling={"rope_type": "su"})
    with pytest.raises(ValueError, match="rope_type 'su' is not supported"):
        ModelSpec.from_config(cfg)
