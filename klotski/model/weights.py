"""Map a checkpoint's HF tensor names to Klotski's canonical per-layer weights, validate, and load them.

Canonical names of one layer (dict keys): ``input_norm``, ``post_attn_norm``; attention (``q``, ``k``, ``v``,
``o``, ``q_bias``.., ``q_norm``, ``k_norm``; MLA names for DeepSeek); ``router`` [E, H] (+ ``router_bias``);
``shared_w13`` [2Is, H], ``shared_w2`` [H, Is], ``shared_gate`` [1, H]; dense layers ``dense_w13``, ``dense_w2``.
Routed experts are read one at a time: ``w13`` [2I, H] (gate rows, then up rows), ``w2`` [H, I].

Two expert key layouts are read:
* per-expert: ``{moe}.experts.{e}.w1/w3/w2.weight`` (Mixtral) or ``.gate_proj/up_proj/down_proj.weight``;
* fused 3-D: ``{moe}.experts.gate_up_proj`` [E, 2I, H] and ``{moe}.experts.down_proj`` [E, H, I].
``{moe}`` is ``model.layers.{i}.mlp`` or ``model.layers.{i}.block_sparse_moe``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from klotski.checkpoint import CheckpointError, SafetensorsIndex, TensorInfo
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


def detect_layout(index: SafetensorsIndex, spec: ModelSpec) -> ExpertLayout:
    """Find which expert key layout the checkpoint uses (looked up on its first MoE layer)."""
    if not spec.moe_layers:
        return ExpertLayout("mlp", False, ("gate_proj", "up_proj", "down_proj"))
    layer = spec.moe_layers[0]
    for prefix in ("mlp", "block_sparse_moe"):
        base = f"model.layers.{layer}.{prefix}.experts"
        if f"{base}.gate_up_proj" in index:
            return ExpertLayout(prefix, True, ("gate_proj", "up_proj", "down_proj"))
        for proj in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
            if f"{base}.0.{proj[0]}.weight" in index:
                return ExpertLayout(prefix, False, proj)
    raise CheckpointError(
        f"{index.model_dir}: cannot find layer {layer}'s experts: expected "
        f"'model.layers.{layer}.mlp.experts.gate_up_proj' (fused) or "
        f"'model.layers.{layer}.mlp.experts.0.w1.weight' / '...experts.0.gate_proj.weight' (per expert)"
    )


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


# Attention-kind -> function(spec, layer prefix) -> canonical sources. DeepSeek's MLA registers "mla".
ATTENTION_SOURCES: dict[str, Callable[[ModelSpec, str], dict[str, Source]]] = {"gqa": gqa_sources}


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


def global_sources(spec: ModelSpec, index: SafetensorsIndex | None = None) -> dict[str, Source]:
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


class CheckpointWeights:
    """A validated checkpoint: canonical tensor sources for every layer and per-expert byte locations."""

    def __init__(self, index: SafetensorsIndex, spec: ModelSpec, extra_ignored: tuple[re.Pattern, ...] = ()):
        self.index = index
        self.spec = spec
        self.layout = detect_layout(index, spec)
        self.globals = global_sources(spec, index)
        self.layers = [layer_sources(spec, i, self.layout) for i in range(spec.num_layers)]
        by_model = EXTRA_IGNORED.get(spec.model_type)
        self._validate(IGNORED + (by_model(spec) if by_model else ()) + tuple(extra_ignored))

    def _validate(self, ignored) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for sources in [self.globals, *self.layers]:
            for src in sources.values():
                expected.update(zip(src.names, src.shapes))
        for layer in self.spec.moe_layers:
            expected.update(expert_names(self.spec, layer, self.layout))
        problems = []
        for name, shape in expected.items():
            if name not in self.index:
                problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
                continue
            info = self.index[name]
            if tuple(info.shape) != tuple(shape):
                problems.append(
                    f"tensor {name!r} in {info.path}: expected shape {list(shape)}, got {list(info.shape)}"
                )
        extra = [n for n in self.index.names() if n not in expected and not any(p.match(n) for p in ignored)]
        problems += [f"unexpected tensor {n!r} in {self.index[n].path}" for n in sorted(extra)]
        if problems:
            head = f"checkpoint {self.index.model_dir} does not match its config ({self.spec.model_type}):"
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise CheckpointError("\n  ".join([head, *shown]))

    # ---- reading ---------------------------------------------------------------------------------------
    def read_source(self, src: Source) -> torch.Tensor:
        parts = [self.index.read(n) for n in src.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def read_global(self) -> dict[str, torch.Tensor]:
        return {k: self.read_source(s) for k, s in self.globals.items()}

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's non-routed-expert tensors (CPU, checkpoint dtype)."""
        return {k: self.read_source(s) for k, s in self.layers[layer].items()}

    def expert_pieces(self, layer: int, expert: int) -> tuple[list[TensorInfo], TensorInfo]:
        """Byte locations of one expert: (w13 pieces in row order, w2). Fused layouts give one w13 piece."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused:
            return (
                [self.index[f"{base}.gate_up_proj"].row_slice(expert)],
                self.index[f"{base}.down_proj"].row_slice(expert),
            )
        g, u, d = self.layout.proj
        return (
            [self.index[f"{base}.{expert}.{g}.weight"], self.index[f"{base}.{expert}.{u}.weight"]],
            self.index[f"{base}.{expert}.{d}.weight"],
        )

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, reading only its bytes."""
        w13_pieces, w2_info = self.expert_pieces(layer, expert)
        w13 = torch.cat([self.index.read(p) for p in w13_pieces], dim=0)
        return w13, self.index.read(w2_info)

    def read_experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a layer: (w13 [E, 2I, H], w2 [E, H, I])."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused:
            return self.index.read(f"{base}.gate_up_proj"), self.index.read(f"{base}.down_proj")
        pairs = [self.read_expert(layer, e) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
