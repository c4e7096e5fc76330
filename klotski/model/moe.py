"""The MoE block of one layer: router, routed experts (through a grouped-expert function), shared expert."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from klotski.model.layers import gated_mlp
from klotski.model.router import route
from klotski.model.spec import ModelSpec
from klotski.triton_kernels.fused_moe import fused_moe_torch

ExpertsFn = Callable[..., torch.Tensor]  # fused_moe signature
Router = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (w, h [T, H]) -> (weights, ids)


def expert_activation(spec: ModelSpec) -> str:
    return {"silu": "silu", "gelu_pytorch_tanh": "gelu", "gelu_tanh": "gelu"}.get(spec.hidden_act) or _bad_act(spec)


def _bad_act(spec: ModelSpec) -> str:
    raise ValueError(f"unsupported expert activation {spec.hidden_act!r}; supported: silu, gelu_pytorch_tanh")


def shared_expert(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor | None:
    """h [T, H] -> the shared expert's contribution [T, H] (gated for Qwen2-MoE), or None if the model has none."""
    if "shared_w13" not in w:
        return None
    out = gated_mlp(h, w["shared_w13"], w["shared_w2"], spec.hidden_act)
    if spec.shared_expert_gate:
        out = torch.sigmoid(F.linear(h, w["shared_gate"])) * out
    return out


def moe_block(
    spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor, experts_fn: ExpertsFn = fused_moe_torch,
    router: Router | None = None,
) -> torch.Tensor:
    """h [T, H] -> [T, H]: routed experts (``w13`` [E, 2I, H], ``w2`` [E, H, I]) plus the shared expert.
    ``router(w, h) -> (topk_weights, topk_ids)`` replaces :func:`route` (e.g. with expert selection)."""
    topk_weights, topk_ids = route(spec, w, h) if router is None else router(w, h)
    out = experts_fn(h, w["w13"], w["w2"], topk_weights, topk_ids, activation=expert_activation(spec))
    shared = shared_expert(spec, w, h)
    return out if shared is None else out + shared


def dense_mlp(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    return gated_mlp(h, w["dense_w13"], w["dense_w2"], spec.hidden_act)
