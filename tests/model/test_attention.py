"""The CPU decode path of grouped-query attention (one matmul per KV head's query group) against SDPA."""
import pytest
import torch
import torch.nn.functional as F

from klotski.model.attention import grouped_decode_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("nh,nkv", [(8, 2), (6, 1), (4, 4)])
def test_grouped_decode_attention_matches_sdpa(dtype, tol, nh, nkv):
    g = torch.Generator().manual_seed(nh * 10 + nkv)
    B, T, D = 3, 37, 16
    q = torch.randn(B, nh, 1, D, generator=g).to(dtype)
    cache = torch.randn(2, B, nkv, T + 5, D, generator=g).to(dtype)
    keys, values = cache[0, :, :, :T], cache[1, :, :, :T]  # views with the cache's capacity stride
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, :, :, :9] = False  # a left-padded row
    mask[2, :, :, 3:5] = False
    ref = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                         scale=D ** -0.5, enable_gqa=nkv != nh)
    out = grouped_decode_attention(q, keys, values, mask, D ** -0.5)
    assert out.shape == (B, nh, 1, D) and out.dtype == dtype
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    # a masked column changes nothing: give it a huge value
    poisoned = values.clone()
    poisoned[0, :, 2] = 1e4
    assert torch.equal(grouped_decode_attention(q, keys, poisoned, mask, D ** -0.5), out)
