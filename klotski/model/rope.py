"""Rotary position embeddings: inverse frequencies per ``RopeSpec`` and their application to q/k.

Matches transformers: cos/sin computed in fp32 from ``inv_freq`` x position, cast to the activation dtype,
``x * cos + rotate_half(x) * sin`` (halves layout) or the interleaved-pairs layout (``RopeSpec.interleaved``).
"""
from __future__ import annotations

import math

import torch

from klotski.model.spec import RopeSpec


class RotaryEmbedding:
    """Holds ``inv_freq`` [dim/2] and the attention scaling for one rope configuration.

    ``rope_dim`` is the number of rotated channels per head (head_dim, or qk_rope_head_dim for MLA).
    """

    def __init__(self, rope: RopeSpec, rope_dim: int, max_position_embeddings: int, device=None):
        self.rope = rope
        self.dim = rope_dim
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        base = torch.arange(0, rope_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / rope_dim
        inv_freq = 1.0 / (rope.theta**base)
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.rope_type == "llama3":
            inv_freq = self._llama3(inv_freq)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = yarn_inv_freq(rope, rope_dim, max_position_embeddings, device)
        self.inv_freq = inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        ex = self.rope.extra
        factor = self.rope.factor
        low, high = float(ex.get("low_freq_factor", 1.0)), float(ex.get("high_freq_factor", 4.0))
        old_ctx = float(ex.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)

    def _dynamic_inv_freq(self, seq_len: int, device) -> torch.Tensor:
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq.to(device)
        factor = self.rope.factor
        theta = self.rope.theta * (
            (factor * seq_len / self.max_position_embeddings) - (factor - 1)
        ) ** (self.dim / (self.dim - 2))
        base = torch.arange(0, self.dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / self.dim
        return 1.0 / (theta**base)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] int -> cos, sin [B, S, dim] in ``dtype``."""
        if self.rope.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(positions.max()) + 1, positions.device)
        else:
            inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq  # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x [B, heads, S, dim]; cos/sin [B, S, dim]."""
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:  # channels (0,1),(2,3),... -> halves layout first, as transformers' DeepSeek does
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos + rotate_half(x) * sin


def yarn_inv_freq(rope: RopeSpec, dim: int, max_pos: int, device) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies; returns (inv_freq, attention scaling)."""
    ex = rope.extra
    factor = rope.factor
    old_ctx = int(ex.get("original_max_position_embeddings") or max_pos)
    beta_fast = float(ex.get("beta_fast") or 32)
    beta_slow = float(ex.get("beta_slow") or 1)
    mscale = ex.get("mscale")
    mscale_all_dim = ex.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if ex.get("attention_factor") is not None:
        attention_factor = float(ex["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = get_mscale(factor, float(mscale)) / get_mscale(factor, float(mscale_all_dim))
    else:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rot):
        return (dim * math.log(old_ctx / (num_rot * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if ex.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor
