"""Routers: router logits -> (topk_weights [T, k] fp32, topk_ids [T, k] int64).

``route`` dispatches on the spec's scoring and top-k method:

* softmax + greedy (Mixtral, Qwen, OLMoE, DeepSeek-V2): softmax in fp32 over all experts, top-k, optional
  renormalisation over the k chosen;
* softmax + group_limited_greedy (DeepSeek-V2): experts split into ``n_group`` groups, each group ranked by its
  best score; only experts of the ``topk_group`` best groups can be chosen;
* sigmoid + noaux_tc (DeepSeek-V3): sigmoid scores plus ``router_bias`` (e_score_correction_bias) pick the
  experts, groups ranked by the sum of their two best biased scores; weights are the unbiased scores,
  optionally renormalised (+1e-20 as in DeepSeek's code).

Then weights are multiplied by ``routed_scaling_factor``. Non-finite logits are sanitised first (NaN -> lowest,
+-inf -> largest/lowest finite) so a broken row still yields valid ids and finite weights; finite rows are
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klotski.model.spec import ModelSpec

# Families whose router multiplies in fp32 (weight and activations upcast), as transformers does for them.
FP32_ROUTER_MODELS = ("deepseek_v2", "deepseek_v3")


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """choice [T, E] -> bool [T, E]: True for experts in each token's ``topk_group`` best groups.

    ``group_score`` "max" ranks a group by its best score (V2), "top2" by the sum of its two best (V3).
    """
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)
    if group_score == "max":
        scores = grouped.max(dim=-1).values
    else:
        scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(scores, topk_group, dim=-1).indices, True)
    return keep[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


def grouped_softmax_topk(
    logits: torch.Tensor, top_k: int, n_group: int, topk_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 group_limited_greedy: logits [T, E] -> (weights [T, k] fp32, ids [T, k])."""
    scores = torch.softmax(logits.float(), dim=-1)
    keep = group_mask(scores, n_group, topk_group, "max")
    return torch.topk(scores.masked_fill(~keep, 0.0), top_k, dim=-1)


def sigmoid_topk(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 noaux_tc: logits [T, E], bias [E] -> (weights [T, k] fp32, ids [T, k])."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        choice = choice.masked_fill(~group_mask(choice, n_group, topk_group, "top2"), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def router_logits(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """h [T, H] -> logits [T, E] (activation dtype, or fp32 for :data:`FP32_ROUTER_MODELS`)."""
    if spec.model_type in FP32_ROUTER_MODELS:
        return F.linear(h.float(), w["router"].float())
    return F.linear(h, w["router"])


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> lowest finite value, +-inf -> largest/lowest finite value (no-op on finite logits)."""
    info = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=info.min, posinf=info.max, neginf=info.min)


def select(spec: ModelSpec, logits: torch.Tensor, bias: torch.Tensor | None = None):
    """logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64) per the spec's routing method."""
    logits = sanitize(logits)
    key = (spec.router_scoring, spec.topk_method)
    if key == ("softmax", "greedy"):
        weights, ids = softmax_topk(logits, spec.top_k, spec.norm_topk_prob)
    elif key == ("softmax", "group_limited_greedy"):
        weights, ids = grouped_softmax_topk(logits, spec.top_k, spec.n_group, spec.topk_group)
    elif spec.router_scoring == "sigmoid" and spec.topk_method in ("noaux_tc", "greedy"):
        n_group = spec.n_group if spec.topk_method == "noaux_tc" else 1
        weights, ids = sigmoid_topk(logits, spec.top_k, bias, n_group, spec.topk_group, spec.norm_topk_prob)
    else:
        raise ValueError(
            f"router scoring {spec.router_scoring!r} with topk_method {spec.topk_method!r} is not supported"
        )
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids


def route(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, H] (normed hidden states) -> (topk_weights [T, k] fp32, topk_ids [T, k] int64)."""
    return select(spec, router_logits(spec, w, h), w.get("router_bias") if spec.router_bias else None)
