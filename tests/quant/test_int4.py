"""The int4 slot layout: packing order, dequantization against a float64 reading written here, RTN error."""
import pytest
import torch

from klotski.quant import Int4Weight, dequantize_int4, pack_int4, quantize_int4, unpack_int4


def reference_dequant(w: Int4Weight) -> torch.Tensor:
    """Element by element, in float64, from the layout's definition (low nibble = even column)."""
    q, s = w.qweight, w.scales.double()
    n_rows, half = q.shape
    out = torch.empty(n_rows, 2 * half, dtype=torch.float64)
    for n in range(n_rows):
        for j in range(half):
            byte = int(q[n, j])
            for k, code in ((2 * j, byte & 0xF), (2 * j + 1, byte >> 4)):
                g = k // w.group_size
                zero = 8 if w.zeros is None else int(w.zeros[n, g])
                out[n, k] = (code - zero) * float(s[n, g])
    return out


def test_pack_order_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_int4(packed), codes)
    g = torch.Generator().manual_seed(0)
    many = torch.randint(0, 16, (3, 5, 24), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(many)), many)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,group", [(24, 8), (40, 8), (64, 16), (48, 48)], ids=["3grp", "5grp", "4grp", "1grp"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize_matches_float64_reading(symmetric, k, group, scale_dtype):
    g = torch.Generator().manual_seed(k + group)
    w = torch.randn(7, k, generator=g) + (0.0 if symmetric else 0.5)
    q = quantize_int4(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    assert q.shape == (7, k) and q.scales.dtype == scale_dtype and q.symmetric == symmetric
    ref = reference_dequant(q)
    got = q.dequantize(torch.float64)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    # fp32 arithmetic matches the float64 reading to fp32 rounding
    assert torch.allclose(dequantize_int4(q.qweight, q.scales, q.zeros, group).double(), ref, rtol=1e-6, atol=1e-7)
    # round to nearest: every weight within half a step (plus the scale's own rounding) of its value
    step = q.scales.float().repeat_interleave(group, -1).double()
    slack = 0.5 if scale_dtype == torch.float32 else 0.5 + 16 * 2 ** -8
    err = (ref - w.double()).abs()
    if symmetric:  # +amax can round to code 16 and be clamped to 15: one step off at most
        assert (err <= step * 1.0 + 1e-6).all()
    else:
        assert (err <= step * slack + 1e-6).all()


def test_stacked_indexing_and_copy():
    g = torch.Generator().manual_seed(1)
    pool = quantize_int4(torch.randn(4, 6, 32, generator=g), 16)
    one = quantize_int4(torch.randn(6, 32, generator=g), 16)
    pool[2].copy_(one)
    assert torch.equal(pool[2].dequantize(), one.dequantize())
    assert pool.nbytes == 4 * 6 * 16 + 4 * 6 * 2 * 4 + 4 * 6 * 2
    with pytest.raises(ValueError, match="does not match"):
        pool[1].copy_(quantize_int4(torch.randn(6, 32, generator=g), 16, symmetric=True))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="not a multiple of group_size 16"):
        quantize_int4(torch.randn(4, 40), 16)
    with pytest.raises(ValueError, match="even int"):
        quantize_int4(torch.randn(4, 40), 5)
    with pytest.raises(ValueError, match=r"scales must have shape \[4, 2\]"):
        Int4Weight(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 3), None, 16)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        Int4Weight(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 2), 16)


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(2, 32)
    w[1, 16:] = 0.25
    for sym in (True, False):
        q = quantize_int4(w, 16, symmetric=sym)
        assert torch.equal(q.dequantize(), w) or sym  # asymmetric: constants and zeros exact
        assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(quantize_int4(w, 16).dequantize(), w)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_per_group(symmetric):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g)
    w[::7, ::13] *= 6  # outliers, which a shrunk range clamps
    plain = quantize_int4(w, 32, symmetric)
    searched = quantize_int4(w, 32, symmetric, clip_search=True)
    err = lambda q: (q.dequantize() - w).square().reshape(64, 4, 32).sum(-1)  # noqa: E731
    assert (err(searched) <= err(plain) * (1 + 1e-6)).all()
    assert err(searched).sum() < 0.97 * err(plain).sum()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_host_dequantize_equals_torch_reference(scale_dtype, symmetric):
    """The host kernel (klotski._C, what dequantize_int4 runs on the CPU) gives the torch reference's values
    bit for bit: stacked slots, odd group counts, fp16 subnormal / negative / zero scales, several threads."""
    from klotski.quant.int4 import dequantize_int4_torch

    g = torch.Generator().manual_seed(3)
    for shape, group in (((3, 10, 48), 16), ((2, 5, 7, 24), 8), ((1100, 2048), 128)):  # the last: 2 threads
        *lead, n, k = shape
        q = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, generator=g)
        scales = (torch.randn(*lead, n, k // group, generator=g) * 10.0 ** torch.randint(-7, 2, (1,), generator=g))
        scales.view(-1)[:3] = torch.tensor([0.0, -1e-6, 6e-8])  # zero, negative, fp16-subnormal
        scales = scales.to(scale_dtype)
        zeros = None if symmetric else torch.randint(0, 17, (*lead, n, k // group), dtype=torch.uint8, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_int4(q, scales, zeros, group, dtype)
            want = dequantize_int4_torch(q, scales, zeros, group, dtype)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32))
    # non-contiguous codes take the torch path, same values
    q = torch.randint(0, 256, (6, 8), dtype=torch.uint8, generator=g)[:, ::2]
    s = torch.rand(6, 1).to(scale_dtype)
    assert torch.equal(dequantize_int4(q, s, None, 8), dequantize_int4_torch(q, s, None, 8))


def test_pool_slots_dequantize_into_the_pools_scratch():
    """A pool's slots dequantize (reuse=True) into one fp32 buffer per pool and thread: same values as a fresh
    dequantization, the same memory for every slot, another pool's buffer apart."""
    w = quantize_int4(torch.randn(3, 16, 32), 8)
    pool = Int4Weight.empty((3, 16, 32), 8, False, torch.float32)
    other = Int4Weight.empty((3, 16, 32), 8, False, torch.float32)
    pool.copy_(w)
    other.copy_(w)
    a = pool[0].dequantize(reuse=True)
    assert torch.equal(a, w[0].dequantize())
    ptr = a.data_ptr()
    b = pool[2].dequantize(reuse=True)
    assert b.data_ptr() == ptr and torch.equal(b, w[2].dequantize())
    assert other[1].dequantize(reuse=True).data_ptr() != ptr
    assert pool[1].dequantize(torch.bfloat16, reuse=True).data_ptr() != ptr  # only fp32 is written in place
    x, y = w[0].dequantize(reuse=True), w[0].dequantize(reuse=True)  # no pool: fresh tensors
    assert x.data_ptr() != y.data_ptr()
