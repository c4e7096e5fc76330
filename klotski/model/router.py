"""Routers: router logits -> (topk_weights [T, k] fp32, topk_ids [T, k] int64).

``route`` dispatches on the spec's scoring/top-k method. Softmax top-k (Mixtral, Qwen, OLMoE): softmax in
fp32 over all experts, top-k, optional renormalisation over the k chosen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klotski.model.spec import ModelSpec


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def router_logits(w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """h [T, H] -> logits [T, E] in the activation dtype."""
    return F.linear(h, w["router"])


def route(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, H] (normed hidden states) -> (topk_weights [T, k] fp32, topk_ids [T, k] int64)."""
    logits = router_logits(w, h)
    if spec.router_scoring == "softmax" and spec.topk_method == "greedy":
        return softmax_topk(logits, spec.top_k, spec.norm_topk_prob)
    raise ValueError(
        f"router scoring {spec.router_scoring!r} with topk_method {spec.topk_method!r} is not supported"
    )
