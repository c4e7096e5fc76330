"""Config parsers for the GQA MoE families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Each maps an HF ``config.json`` to a :class:`~klotski.model.spec.ModelSpec`; the differences between them
(shared expert + gate, q/k/v bias, q/k norms, sparse-step layers, top-k renormalisation) become spec fields.
"""
from __future__ import annotations

from klotski.model.spec import ModelSpec, common_fields, parse_rope, register, require, sparse_layer_kinds


def read_num_experts(config: dict, default: int) -> int:
    """Hub configs say ``num_experts``; transformers v5 saves some as ``num_local_experts``."""
    for key in ("num_experts", "num_local_experts"):
        if config.get(key) is not None:
            return int(config[key])
    return default


@register("mixtral")
def parse_mixtral(config: dict) -> ModelSpec:
    f = common_fields(config)
    n = read_num_experts(config, 8)
    inter = int(require(config, "intermediate_size"))
    return ModelSpec(
        **f,
        intermediate_size=0,
        moe_intermediate_size=inter,
        num_experts=n,
        top_k=int(config.get("num_experts_per_tok", 2)),
        layer_kinds=("moe",) * f["num_layers"],
        rope=parse_rope(config, default_theta=1e6),
        norm_topk_prob=True,  # Mixtral renormalises its top-k softmax weights
    )


@register("qwen2_moe")
def parse_qwen2_moe(config: dict) -> ModelSpec:
    f = common_fields(config)
    n = read_num_experts(config, 60)
    shared = int(config.get("shared_expert_intermediate_size", 0) or 0)
    return ModelSpec(
        **f,
        intermediate_size=int(config.get("intermediate_size", 0) or 0),
        moe_intermediate_size=int(require(config, "moe_intermediate_size")),
        num_experts=n,
        top_k=int(config.get("num_experts_per_tok", 4)),
        layer_kinds=sparse_layer_kinds(config, f["num_layers"], n),
        rope=parse_rope(config),
        attention_bias=bool(config.get("qkv_bias", True)),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=shared > 0,
    )


@register("qwen3_moe")
def parse_qwen3_moe(config: dict) -> ModelSpec:
    f = common_fields(config)
    n = read_num_experts(config, 128)
    return ModelSpec(
        **f,
        intermediate_size=int(config.get("intermediate_size", 0) or 0),
        moe_intermediate_size=int(require(config, "moe_intermediate_size")),
        num_experts=n,
        top_k=int(config.get("num_experts_per_tok", 8)),
        layer_kinds=sparse_layer_kinds(config, f["num_layers"], n),
        rope=parse_rope(config),
        attention_bias=bool(config.get("attention_bias", False)),
        qk_norm="head",
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
    )


@register("olmoe")
def parse_olmoe(config: dict) -> ModelSpec:
    f = common_fields(config)
    return ModelSpec(
        **f,
        intermediate_size=0,
        moe_intermediate_size=int(require(config, "intermediate_size")),
        num_experts=read_num_experts(config, 64),
        top_k=int(config.get("num_experts_per_tok", 8)),
        layer_kinds=("moe",) * f["num_layers"],
        rope=parse_rope(config),
        attention_bias=bool(config.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=config.get("clip_qkv"),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
    )
