"""Grouped-query attention with a KV cache (Mixtral, Qwen2/3-MoE, OLMoE).

Weights (dict keys of one layer): ``q`` [heads*D, H], ``k``/``v`` [kv_heads*D, H], ``o`` [H, heads*D],
optional ``q_bias``/``k_bias``/``v_bias``, optional ``q_norm``/``k_norm`` ([D] per head, or full width).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.rope import RotaryEmbedding, apply_rope
from klotski.model.spec import ModelSpec


def gqa_attention(
    spec: ModelSpec,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    cache: KVCache,
    layer: int,
    rotary: RotaryEmbedding,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """x [B, S, H] (normed) -> attention output [B, S, H]; appends S columns to ``cache`` at ``cache.length``."""
    return gqa_output(spec, w, gqa_core(spec, gqa_project(spec, w, x, rotary, positions), cache, layer, mask))


def gqa_project(spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor, rotary: RotaryEmbedding,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, S, H] (normed) -> rotated q [B, heads, S, D], k / v [B, kv_heads, S, D]."""
    B, S, _ = x.shape
    D, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q = F.linear(x, w["q"], w.get("q_bias"))
    k = F.linear(x, w["k"], w.get("k_bias"))
    v = F.linear(x, w["v"], w.get("v_bias"))
    if spec.qk_norm == "full":
        q = rms_norm(q, w["q_norm"], spec.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], spec.rms_norm_eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = q.view(B, S, nh, D)
    k = k.view(B, S, nkv, D)
    if spec.qk_norm == "head":
        q = rms_norm(q, w["q_norm"], spec.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], spec.rms_norm_eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(B, S, nkv, D).transpose(1, 2)
    cos, sin = rotary.cos_sin(positions, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def gqa_core(spec: ModelSpec, qkv: tuple[torch.Tensor, ...], cache: KVCache, layer: int,
             mask: torch.Tensor) -> torch.Tensor:
    """Append k / v to ``cache`` (wherever it lives: the offloaded runtime runs this on the host over a host
    cache) and attend -> [B, heads, S, D]."""
    q, k, v = qkv
    S, D, nh, nkv = q.shape[2], spec.head_dim, spec.num_heads, spec.num_kv_heads
    keys = cache.buffer(layer, "k", (nkv, cache.capacity, D), True, k)
    values = cache.buffer(layer, "v", (nkv, cache.capacity, D), True, v)
    end = cache.length + S
    keys[:, :, cache.length : end] = k
    values[:, :, cache.length : end] = v
    if S == 1 and nkv != nh and q.device.type == "cpu":
        return grouped_decode_attention(q, keys[:, :, :end], values[:, :, :end], mask, D**-0.5)
    return F.scaled_dot_product_attention(
        q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=D**-0.5, enable_gqa=nkv != nh
    )


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """One decode column of grouped-query attention on the CPU: q [B, heads, 1, D], keys / values
    [B, kv_heads, T, D] (views of the cache), mask [B, 1, 1, T] bool (True: attend) -> [B, heads, 1, D].

    Each KV head's group of query heads is one [G, D] x [D, T] matmul, so every K and V byte is read once and no
    expanded copy of the cache is made (CPU SDPA with ``enable_gqa`` was 1.2-2x slower on Mixtral's shape;
    ``bench/kernels/bench_cpu_host_ops.py``). Scores in the input dtype, softmax in fp32 (transformers' eager
    attention does the same)."""
    B, nh, _, D = q.shape
    nkv = keys.shape[1]
    scores = torch.matmul(q.reshape(B, nkv, nh // nkv, D), keys.transpose(-1, -2)) * scale  # [B, kv, G, T]
    scores = scores.masked_fill(~mask.reshape(B, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).reshape(B, nh, 1, D)


def gqa_output(spec: ModelSpec, w: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """[B, heads, S, D] -> the output projection [B, S, H]."""
    B, _, S, _ = out.shape
    return F.linear(out.transpose(1, 2).reshape(B, S, spec.num_heads * spec.head_dim), w["o"])
