"""DeepSeek rotary layouts: our ``apply_rope(interleaved=True)`` against transformers' V3 and V2 forms."""
import torch

from klotski.model.rope import RotaryEmbedding, apply_rope
from klotski.model.spec import RopeSpec


def setup(seed=0, B=2, heads=3, S=5, dim=8):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, heads, S, dim, generator=g), torch.randn(B, 1, S, dim, generator=g)
    rotary = RotaryEmbedding(RopeSpec(theta=10000.0), dim, 256)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    return q, k, rotary, positions


def test_interleaved_matches_transformers_v3_interleave():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    q, k, rotary, positions = setup()
    cos, sin = rotary.cos_sin(positions, torch.float32)
    ref_q, ref_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, interleaved=True), ref_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin, interleaved=True), ref_k, rtol=0, atol=1e-6)


def test_halves_layout_matches_transformers_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

    q, k, rotary, positions = setup(1)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), ref_q) and torch.equal(apply_rope(k, cos, sin), ref_k)


def test_interleaved_scores_match_transformers_v2_complex_rotation():
    """V2 rotates interleaved pairs as complex numbers and keeps the interleaved layout; we de-interleave.
    Only q.k products reach the model, and those agree."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    q, k, rotary, positions = setup(2)
    freqs = positions.float()[..., None] * rotary.inv_freq
    ref_q, ref_k = apply_rotary_emb(q, k, torch.polar(torch.ones_like(freqs), freqs))
    cos, sin = rotary.cos_sin(positions, torch.float32)
    ours_q, ours_k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
    torch.testing.assert_close(ours_q @ ours_k.transpose(-1, -2), ref_q @ ref_k.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    # and the layouts really differ (so the interleaved flag is needed at all)
    assert not torch.allclose(apply_rope(q, cos, sin), ours_q, atol=1e-3)
