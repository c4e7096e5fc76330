"""HF tensor names of every canonical weight, per architecture and expert key layout (no torch import).

Canonical names of one layer: ``input_norm``, ``post_attn_norm``; attention (GQA: ``q``, ``k``, ``v``, ``o``,
biases, ``q_norm``/``k_norm``; MLA: ``q_a``, ``q_a_norm``, ``q_b`` or ``q``, ``kv_a``, ``kv_a_norm``, ``kv_b``,
``o``); ``router`` [E, H] (+ ``router_bias``); ``shared_w13``/``shared_w2``/``shared_gate``; dense layers
``dense_w13``/``dense_w2``. Kept torch-free so planning a model (``klotski plan``) stays fast to start.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from klotski.model.spec import ModelSpec


@dataclass(frozen=True)
class Source:
    """One canonical tensor: HF tensors concatenated along dim 0 (one name for most)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ExpertLayout:
    moe_prefix: str  # "mlp" or "block_sparse_moe"
    fused: bool
    proj: tuple[str, str, str]  # per-expert (gate, up, down) names: ("w1", "w3", "w2") or gate/up/down_proj


IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)
# Canonical per-layer names loaded in fp32 whatever the compute dtype (transformers keeps DeepSeek-V3's
# e_score_correction_bias in fp32: rounding it to bf16 can flip expert choices).
KEEP_FP32 = frozenset({"router_bias"})
# model_type -> function(spec) -> more patterns (objects with ``.match(name)``) of tensors a checkpoint may
# carry that inference does not use (DeepSeek-V3's multi-token-prediction layers).
EXTRA_IGNORED: dict[str, Callable[[ModelSpec], tuple]] = {}


def gqa_sources(spec: ModelSpec, p: str) -> dict[str, Source]:
    H, D = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * D, spec.num_kv_heads * D
    out = {
        "q": Source((f"{p}.self_attn.q_proj.weight",), ((q_out, H),)),
        "k": Source((f"{p}.self_attn.k_proj.weight",), ((kv_out, H),)),
        "v": Source((f"{p}.self_attn.v_proj.weight",), ((kv_out, H),)),
        "o": Source((f"{p}.self_attn.o_proj.weight",), ((H, q_out),)),
    }
    if spec.attention_bias:
        out["q_bias"] = Source((f"{p}.self_attn.q_proj.bias",), ((q_out,),))
        out["k_bias"] = Source((f"{p}.self_attn.k_proj.bias",), ((kv_out,),))
        out["v_bias"] = Source((f"{p}.self_attn.v_proj.bias",), ((kv_out,),))
    if spec.qk_norm != "none":
        head = spec.qk_norm == "head"
        out["q_norm"] = Source((f"{p}.self_attn.q_norm.weight",), ((D if head else q_out,),))
        out["k_norm"] = Source((f"{p}.self_attn.k_norm.weight",), ((D if head else kv_out,),))
    return out


def mla_sources(spec: ModelSpec, p: str) -> dict[str, Source]:
    """Canonical MLA tensors of layer prefix ``p`` -> HF names and shapes."""
    H, h = spec.hidden_size, spec.num_heads
    a = f"{p}.self_attn"
    qk, r, dr = spec.q_head_dim, spec.kv_lora_rank, spec.qk_rope_head_dim
    out = {}
    if spec.q_lora_rank:
        ql = spec.q_lora_rank
        out["q_a"] = Source((f"{a}.q_a_proj.weight",), ((ql, H),))
        out["q_a_norm"] = Source((f"{a}.q_a_layernorm.weight",), ((ql,),))
        out["q_b"] = Source((f"{a}.q_b_proj.weight",), ((h * qk, ql),))
        if spec.attention_bias:
            out["q_a_bias"] = Source((f"{a}.q_a_proj.bias",), ((ql,),))
    else:
        out["q"] = Source((f"{a}.q_proj.weight",), ((h * qk, H),))
    out["kv_a"] = Source((f"{a}.kv_a_proj_with_mqa.weight",), ((r + dr, H),))
    out["kv_a_norm"] = Source((f"{a}.kv_a_layernorm.weight",), ((r,),))
    out["kv_b"] = Source((f"{a}.kv_b_proj.weight",), ((h * (spec.qk_nope_head_dim + spec.v_head_dim), r),))
    out["o"] = Source((f"{a}.o_proj.weight",), ((H, h * spec.v_head_dim),))
    if spec.attention_bias:
        out["kv_a_bias"] = Source((f"{a}.kv_a_proj_with_mqa.bias",), ((r + dr,),))
        out["o_bias"] = Source((f"{a}.o_proj.bias",), ((H,),))
    return out


# Attention-kind -> function(spec, layer prefix) -> canonical sources. DeepSeek's MLA registers "mla".
ATTENTION_SOURCES: dict[str, Callable[[ModelSpec, str], dict[str, Source]]] = {"gqa": gqa_sources, "mla": mla_sources}


def mlp_sources(p: str, hidden: int, inter: int, key_prefix: str, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = (f"{p}.{n}.weight" for n in names)
    return {
        f"{key_prefix}w13": Source((g, u), ((inter, hidden), (inter, hidden))),
        f"{key_prefix}w2": Source((d,), ((hidden, inter),)),
    }


def layer_sources(spec: ModelSpec, layer: int, layout: ExpertLayout) -> dict[str, Source]:
    """Canonical non-routed-expert tensors of one layer."""
    p = f"model.layers.{layer}"
    H = spec.hidden_size
    out = {
        "input_norm": Source((f"{p}.input_layernorm.weight",), ((H,),)),
        "post_attn_norm": Source((f"{p}.post_attention_layernorm.weight",), ((H,),)),
    }
    out.update(ATTENTION_SOURCES[spec.attention](spec, p))
    if not spec.is_moe(layer):
        out.update(mlp_sources(f"{p}.mlp", H, spec.intermediate_size, "dense_"))
        return out
    m = f"{p}.{layout.moe_prefix}"
    out["router"] = Source((f"{m}.gate.weight",), ((spec.num_experts, H),))
    if spec.router_bias:
        out["router_bias"] = Source((f"{m}.gate.e_score_correction_bias",), ((spec.num_experts,),))
    if spec.shared_expert_intermediate_size:
        name = "shared_experts" if spec.num_shared_experts else "shared_expert"
        out.update(mlp_sources(f"{m}.{name}", H, spec.shared_expert_intermediate_size, "shared_"))
    if spec.shared_expert_gate:
        out["shared_gate"] = Source((f"{m}.shared_expert_gate.weight",), ((1, H),))
    return out


def global_sources(spec: ModelSpec, index=None) -> dict[str, Source]:
    V, H = spec.vocab_size, spec.hidden_size
    out = {
        "embed": Source(("model.embed_tokens.weight",), ((V, H),)),
        "norm": Source(("model.norm.weight",), ((H,),)),
    }
    if not spec.tie_word_embeddings or (index is not None and "lm_head.weight" in index):
        out["lm_head"] = Source(("lm_head.weight",), ((V, H),))
    return out


def expert_names(spec: ModelSpec, layer: int, layout: ExpertLayout) -> dict[str, tuple[int, ...]]:
    """HF names -> expected shapes of one layer's routed experts."""
    E, H, I = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    base = f"model.layers.{layer}.{layout.moe_prefix}.experts"
    if layout.fused:
        return {f"{base}.gate_up_proj": (E, 2 * I, H), f"{base}.down_proj": (E, H, I)}
    g, u, d = layout.proj
    out = {}
    for e in range(E):
        out[f"{base}.{e}.{g}.weight"] = (I, H)
        out[f"{base}.{e}.{u}.weight"] = (I, H)
        out[f"{base}.{e}.{d}.weight"] = (H, I)
    return out
