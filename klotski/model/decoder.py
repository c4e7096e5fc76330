"""One decoder layer's math, split at the points the offloaded runtime schedules around.

``attention_step`` (norm + attention + residual) and ``mlp_step`` (norm + MoE or dense MLP + residual) are
separate so a runtime can run the n attentions of a batch group, then the experts over all n batches.
Attention kinds dispatch through :data:`ATTENTION` ("gqa", "mla").
"""
from __future__ import annotations

from typing import Callable

import torch

from klotski.model.attention import gqa_attention, gqa_core, gqa_output, gqa_project
from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.mla import mla_absorbed_core, mla_absorbed_output, mla_attention, mla_project_absorbed
from klotski.model.moe import ExpertsFn, Router, dense_mlp, moe_block
from klotski.model.rope import RotaryEmbedding
from klotski.model.spec import ModelSpec
from klotski.triton_kernels.fused_moe import fused_moe_torch

ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"gqa": gqa_attention, "mla": mla_attention}
# attention split around its cache, for a runtime that attends where the cache lives (the host):
# (project(spec, w, normed x, rotary, positions) -> parts, core(spec, parts, cache, layer, mask) -> out,
#  output(spec, w, out) -> [B, S, H]); MLA in its absorbed form (the core needs no weight)
ATTENTION_SPLIT = {"gqa": (gqa_project, gqa_core, gqa_output),
                   "mla": (mla_project_absorbed, mla_absorbed_core, mla_absorbed_output)}


def rope_dim(spec: ModelSpec) -> int:
    return spec.qk_rope_head_dim if spec.attention == "mla" else spec.head_dim


def make_rotary(spec: ModelSpec, device=None) -> RotaryEmbedding:
    return RotaryEmbedding(spec.rope, rope_dim(spec), spec.max_position_embeddings, device)


def attention_step(
    spec: ModelSpec,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    cache: KVCache,
    layer: int,
    rotary: RotaryEmbedding,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """x [B, S, H] residual stream -> x + attention(norm(x)). Appends to the cache (caller advances length)."""
    h = rms_norm(x, w["input_norm"], spec.rms_norm_eps)
    return x + ATTENTION[spec.attention](spec, w, h, cache, layer, rotary, mask, positions)


def mlp_step(
    spec: ModelSpec,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    layer: int,
    valid: torch.Tensor | None = None,
    experts_fn: ExpertsFn = fused_moe_torch,
    router: Router | None = None,
) -> torch.Tensor:
    """x [B, S, H] -> x + mlp(norm(x)); only the ``valid`` [B, S] tokens (not padding) go through the MLP.
    ``router``: see :func:`klotski.model.moe.moe_block`."""
    B, S, H = x.shape
    flat = x.reshape(B * S, H)
    rows = valid.reshape(-1).nonzero().squeeze(1) if valid is not None else None
    tokens = flat if rows is None else flat.index_select(0, rows)
    h = rms_norm(tokens, w["post_attn_norm"], spec.rms_norm_eps)
    y = moe_block(spec, w, h, experts_fn, router) if spec.is_moe(layer) else dense_mlp(spec, w, h)
    if rows is None:
        return (flat + y).view(B, S, H)
    return flat.index_add(0, rows, y.to(flat.dtype)).view(B, S, H)
