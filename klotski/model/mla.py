"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Per token, the cache keeps only the normed KV latent ``c`` [kv_lora_rank] and the shared rotated key
``k_rope`` [qk_rope_head_dim] (what ``ModelSpec.kv_cache_elems_per_token`` counts), never per-head K/V.

Math (h heads; dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, r = kv_lora_rank)::

    q            = x W_q                    or  rms_norm(x W_qa) W_qb            [h, dn + dr] per token
    c, k_rope    = split(x W_kva)           c = rms_norm(c)                      [r], [dr]
    q_rope, k_rope = rope(q_rope), rope(k_rope)
    W_kvb        = [W_uk | W_uv] per head                                        [h, dn + dv, r]
    expanded:  k = [c W_uk^T, k_rope], v = c W_uv^T; softmax(q k^T * scale) v
    absorbed:  q_c = q_nope W_uk (per head, [r]); MQA over keys [c, k_rope], values c; out = out_c W_uv^T

Both forms are exact rewrites of each other; ``mla_attention`` picks the cheaper one per call (absorbed for
decode, expanded for long prefill) unless told. ``scale`` is qk_head_dim^-0.5 times yarn's mscale(all_dim)^2.

Weights (one layer's dict keys): ``q`` [h*(dn+dr), H] or ``q_a`` [q_lora_rank, H] + ``q_a_norm`` + ``q_b``
[h*(dn+dr), q_lora_rank]; ``kv_a`` [r+dr, H]; ``kv_a_norm`` [r]; ``kv_b`` [h*(dn+dv), r]; ``o`` [H, h*dv];
with ``attention_bias``: ``q_a_bias``, ``kv_a_bias``, ``o_bias``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.rope import RotaryEmbedding, apply_rope
from klotski.model.spec import ModelSpec

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use RMSNorm's default eps, not rms_norm_eps




def softmax_scale(spec: ModelSpec) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 for scaled rope (DeepSeek's yarn)."""
    scale = spec.q_head_dim**-0.5
    mscale_all_dim = spec.rope.extra.get("mscale_all_dim")
    if spec.rope.rope_type != "default" and mscale_all_dim and spec.rope.factor > 1:
        m = 0.1 * float(mscale_all_dim) * math.log(spec.rope.factor) + 1.0
        scale *= m * m
    return scale


def prefer_absorbed(spec: ModelSpec, q_len: int) -> bool:
    """Absorbed costs ~q_len*kv_len*h*(2r+dr); expanded ~kv_len*h*(r*(dn+dv) + q_len*(dn+dr+dv)) MACs."""
    r, dn, dr, dv = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    return q_len * (2 * r + dr) < r * (dn + dv) + q_len * (dn + dr + dv)


def rotate(spec: ModelSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on x [B, heads, S, dr]; transformers' DeepSeek-V2 rotates in fp32 (complex), V3 in x's dtype."""
    if spec.model_type == "deepseek_v2":
        return apply_rope(x.float(), cos.float(), sin.float(), spec.rope.interleaved).to(x.dtype)
    return apply_rope(x, cos, sin, spec.rope.interleaved)


def mla_attention(
    spec: ModelSpec,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    cache: KVCache,
    layer: int,
    rotary: RotaryEmbedding,
    mask: torch.Tensor,
    positions: torch.Tensor,
    absorb: bool | None = None,
) -> torch.Tensor:
    """x [B, S, H] (normed) -> [B, S, H]; appends S latent + rope-key columns to ``cache`` at ``cache.length``.

    ``mask`` [B, 1, S, kv_len] bool; ``absorb`` forces the absorbed (True) or expanded (False) form.
    """
    B, S, _ = x.shape
    h, dn, dv = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim
    q_nope, q_rope, latent, k_rope = _project(spec, w, x, rotary, positions)
    if absorb if absorb is not None else prefer_absorbed(spec, S):
        query = _absorb_query(spec, w, q_nope, q_rope)
        return mla_absorbed_output(spec, w, mla_absorbed_core(spec, (query, latent, k_rope), cache, layer, mask))
    c, kr = _append(spec, cache, layer, latent, k_rope)
    L = c.shape[1]
    kv = F.linear(c, w["kv_b"]).view(B, L, h, dn + dv).transpose(1, 2)
    k_nope, v = kv.split([dn, dv], dim=-1)
    key = torch.cat([k_nope, kr[:, None].expand(B, h, L, spec.qk_rope_head_dim)], dim=-1)
    query = torch.cat([q_nope, q_rope], dim=-1)
    out = F.scaled_dot_product_attention(query, key, v, attn_mask=mask, scale=softmax_scale(spec))
    return F.linear(out.transpose(1, 2).reshape(B, S, h * dv), w["o"], w.get("o_bias"))


def _project(spec, w, x, rotary, positions):
    """x [B, S, H] (normed) -> q_nope [B, h, S, dn], rotated q_rope [B, h, S, dr], normed latent [B, S, r],
    rotated k_rope [B, S, dr]."""
    B, S, _ = x.shape
    h, dn, dr, r = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
    if spec.q_lora_rank:
        q = F.linear(rms_norm(F.linear(x, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], LATENT_NORM_EPS), w["q_b"])
    else:
        q = F.linear(x, w["q"])
    q_nope, q_rope = q.view(B, S, h, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)  # [B, h, S, dn|dr]
    latent, k_rope = F.linear(x, w["kv_a"], w.get("kv_a_bias")).split([r, dr], dim=-1)
    latent = rms_norm(latent, w["kv_a_norm"], LATENT_NORM_EPS)  # [B, S, r]
    cos, sin = rotary.cos_sin(positions, x.dtype)
    q_rope = rotate(spec, q_rope, cos, sin)
    k_rope = rotate(spec, k_rope[:, None], cos, sin)[:, 0]  # [B, S, dr]
    return q_nope, q_rope, latent, k_rope


def _append(spec, cache, layer, latent, k_rope):
    """Write the S new latent / rope-key columns at ``cache.length`` -> the filled c [B, L, r], kr [B, L, dr]."""
    S = latent.shape[1]
    latents = cache.buffer(layer, "latent", (cache.capacity, spec.kv_lora_rank), True, latent)
    rope_keys = cache.buffer(layer, "k_rope", (cache.capacity, spec.qk_rope_head_dim), True, k_rope)
    end = cache.length + S
    latents[:, cache.length : end] = latent
    rope_keys[:, cache.length : end] = k_rope
    return latents[:, :end], rope_keys[:, :end]


def _absorb_query(spec, w, q_nope, q_rope):
    """The absorbed query [B, h, S, r + dr]: q_nope W_uk per head, then the rotated q_rope."""
    dn, dv, r = spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    w_kvb = w["kv_b"].view(spec.num_heads, dn + dv, r)
    return torch.cat([torch.matmul(q_nope, w_kvb[:, :dn]), q_rope], dim=-1)


def mla_project_absorbed(spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor, rotary: RotaryEmbedding,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device's half before the cache: x [B, S, H] (normed) -> (absorbed query [B, h, S, r + dr], latent
    [B, S, r], k_rope [B, S, dr])."""
    q_nope, q_rope, latent, k_rope = _project(spec, w, x, rotary, positions)
    return _absorb_query(spec, w, q_nope, q_rope), latent, k_rope


def mla_absorbed_core(spec: ModelSpec, parts: tuple[torch.Tensor, ...], cache: KVCache, layer: int,
                      mask: torch.Tensor) -> torch.Tensor:
    """Append the latent / rope key to ``cache`` (wherever it lives) and attend in latent space (MQA over keys
    [c, k_rope], values c) -> out_c [B, h, S, r]. Needs no weight: it can run where the cache is."""
    query, latent, k_rope = parts
    c, kr = _append(spec, cache, layer, latent, k_rope)
    key = torch.cat([c, kr], dim=-1)[:, None]  # [B, 1, L, r + dr]: one shared "KV head"
    return F.scaled_dot_product_attention(query, key, c[:, None], attn_mask=mask, scale=softmax_scale(spec),
                                          enable_gqa=True)


def mla_absorbed_output(spec: ModelSpec, w: dict[str, torch.Tensor], out_c: torch.Tensor) -> torch.Tensor:
    """out_c [B, h, S, r] -> W_uv per head, then the output projection [B, S, H]."""
    B, h, S, _ = out_c.shape
    dn, dv, r = spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    w_kvb = w["kv_b"].view(h, dn + dv, r)
    out = torch.matmul(out_c, w_kvb[:, dn:].transpose(1, 2))  # [B, h, S, dv]
    return F.linear(out.transpose(1, 2).reshape(B, S, h * dv), w["o"], w.get("o_bias"))
