"""Small shared pieces of a decoder layer: RMSNorm and the gated dense MLP (also the shared expert)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, then scaled (transformers' order of operations)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def act_fn(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}; supported: silu, gelu, gelu_pytorch_tanh")


def gated_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """x [T, H]; w13 [2I, H] (gate rows then up rows); w2 [H, I] -> [T, H]."""
    inter = w2.shape[-1]
    gate_up = F.linear(x, w13)
    return F.linear(act_fn(act)(gate_up[..., :inter]) * gate_up[..., inter:], w2)
