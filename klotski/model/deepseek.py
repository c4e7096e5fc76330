"""Config parsers for the DeepSeek-V2/V3 family: multi-head latent attention, shared experts, grouped routing.

One parser serves both versions (and the built-in cost presets in :mod:`klotski.presets`); the version decides
the router, as in transformers' ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter``:

* ``deepseek_v2``: softmax scores; ``topk_method`` greedy or group_limited_greedy (groups ranked by their best
  expert); weights are the top-k scores times ``routed_scaling_factor``. transformers' V2 never renormalises
  (``norm_topk_prob`` is ignored there; every released V2 checkpoint sets it false), so the spec says false.
* ``deepseek_v3``: sigmoid scores plus ``e_score_correction_bias`` choose the experts (groups ranked by the sum
  of their two best biased scores), the unbiased scores weight them; optional renormalisation, then scaling.
  transformers always runs this "noaux_tc" router for V3 whatever ``topk_method`` says (n_group 1 = no groups).

Rotary: the ``qk_rope_head_dim`` channels rotate in interleaved pairs (always for V2, ``rope_interleave``
for V3, default true). Layers ``i >= first_k_dense_replace`` with ``i % moe_layer_freq == 0`` are MoE.
V3 checkpoints carry ``num_nextn_predict_layers`` multi-token-prediction layers after the decoder (index
``num_hidden_layers`` onwards); inference does not use them, so their tensors are ignored when loading.
"""
from __future__ import annotations

import dataclasses
import re

from klotski.model.spec import ModelSpec, UnsupportedModelError, common_fields, parse_rope, register, require
from klotski.model.names import EXTRA_IGNORED


def deepseek_layer_kinds(config: dict, num_layers: int, num_experts: int) -> tuple[str, ...]:
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return tuple(
        "moe" if num_experts > 0 and i >= first_dense and i % freq == 0 else "dense" for i in range(num_layers)
    )


def parse_deepseek_rope(config: dict, interleaved: bool):
    rope = parse_rope(config)
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if rope.rope_type == "yarn" and params.get("factor") is None:  # transformers: max length / original length
        original = rope.extra.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        rope = dataclasses.replace(rope, factor=float(require(config, "max_position_embeddings")) / float(original))
    return dataclasses.replace(rope, interleaved=interleaved)


def check_groups(model_type: str, num_experts: int, top_k: int, n_group: int, topk_group: int, min_per_group: int):
    where = f"config.json ({model_type})"
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"{where}: n_routed_experts={num_experts} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{where}: topk_group={topk_group} must be in [1, n_group={n_group}]")
    per_group = num_experts // n_group
    if n_group > 1 and per_group < min_per_group:
        raise ValueError(f"{where}: {per_group} experts per group; this router needs at least {min_per_group}")
    if n_group > 1 and top_k > topk_group * per_group:
        raise ValueError(
            f"{where}: num_experts_per_tok={top_k} exceeds the {topk_group} kept groups x {per_group} experts"
        )


def parse_deepseek(config: dict, version: int) -> ModelSpec:
    model_type = config["model_type"]
    f = common_fields(config)
    heads = f["num_heads"]
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if kv_heads != heads:
        raise ValueError(
            f"config.json ({model_type}): multi-head latent attention needs num_key_value_heads == "
            f"num_attention_heads, got {kv_heads} and {heads}"
        )
    nope = int(require(config, "qk_nope_head_dim"))
    rope_dim = int(require(config, "qk_rope_head_dim"))
    if rope_dim % 2:
        raise ValueError(f"config.json ({model_type}): qk_rope_head_dim must be even, got {rope_dim}")
    num_experts = int(config.get("n_routed_experts") or config.get("num_local_experts") or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    moe_inter = int(require(config, "moe_intermediate_size")) if num_experts else 0
    n_shared = int(config.get("n_shared_experts") or 0)
    kinds = deepseek_layer_kinds(config, f["num_layers"], num_experts)
    n_group = int(config.get("n_group") or 1)
    topk_group = int(config.get("topk_group") or n_group)

    if version == 2:
        scoring = config.get("scoring_func") or "softmax"
        method = config.get("topk_method") or "greedy"
        if scoring != "softmax":
            raise UnsupportedModelError(f"deepseek_v2: scoring_func {scoring!r} is not supported (softmax only)")
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"deepseek_v2: topk_method {method!r} is not supported; supported: greedy, group_limited_greedy"
            )
        router = dict(router_scoring="softmax", topk_method=method, norm_topk_prob=False, router_bias=False)
        if method == "greedy":
            n_group = topk_group = 1
        min_per_group = 1
    else:
        scoring = config.get("scoring_func") or "sigmoid"
        if scoring != "sigmoid":
            raise UnsupportedModelError(f"deepseek_v3: scoring_func {scoring!r} is not supported (sigmoid only)")
        router = dict(router_scoring="sigmoid", topk_method="noaux_tc", router_bias=True,
                      norm_topk_prob=bool(config.get("norm_topk_prob", True)))
        min_per_group = 2  # groups are ranked by the sum of their two best scores
    if num_experts:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"config.json ({model_type}): num_experts_per_tok={top_k} not in [1, {num_experts}]")
        check_groups(model_type, num_experts, top_k, n_group, topk_group, min_per_group)

    return ModelSpec(
        **{**f, "num_kv_heads": heads, "head_dim": nope + rope_dim},
        intermediate_size=int(require(config, "intermediate_size")) if "dense" in kinds else 0,
        moe_intermediate_size=moe_inter,
        num_experts=num_experts,
        top_k=top_k,
        layer_kinds=kinds,
        rope=parse_deepseek_rope(config, interleaved=version == 2 or bool(config.get("rope_interleave", True))),
        attention_bias=bool(config.get("attention_bias", False)),
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        n_group=n_group,
        topk_group=topk_group,
        num_shared_experts=n_shared,
        shared_expert_intermediate_size=n_shared * moe_inter,
        attention="mla",
        q_lora_rank=int(config.get("q_lora_rank") or 0),
        kv_lora_rank=int(require(config, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(require(config, "v_head_dim")),
        **router,
    )


@register("deepseek_v2")
def parse_deepseek_v2(config: dict) -> ModelSpec:
    return parse_deepseek(config, version=2)


@register("deepseek_v3")
def parse_deepseek_v3(config: dict) -> ModelSpec:
    return parse_deepseek(config, version=3)


class LayersFrom:
    """Matches tensor names of decoder layers with index >= ``first`` (``re.Pattern``-like ``match``)."""

    LAYER = re.compile(r"model\.layers\.(\d+)\.")

    def __init__(self, first: int):
        self.first = first

    def match(self, name: str) -> bool:
        m = self.LAYER.match(name)
        return m is not None and int(m.group(1)) >= self.first


def mtp_layers_ignored(spec: ModelSpec) -> tuple[LayersFrom, ...]:
    """DeepSeek-V3's multi-token-prediction layers follow the last decoder layer; generation skips them."""
    return (LayersFrom(spec.num_layers),)


EXTRA_IGNORED["deepseek_v3"] = mtp_layers_ignored
