"""GPTQ / AWQ / compressed-tensors 4-bit tensors read into the int4 slot layout, checked against packers and a
float64 dequantization written here from each format's definition (odd group counts, asymmetric zero points)."""
import pytest
import torch

from klotski.quant.checkpoint_formats import (Int4Format, UnsupportedQuantization, awq_to_int4,
                                              compressed_tensors_to_int4, gptq_to_int4, parse_int4_checkpoint)

N, K, G = 16, 24, 8  # 3 groups per row
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_words(values: list[int], order=range(8)) -> int:
    """Eight 4-bit values into one int32: slot i (bits 4i..) holds values[order[i]]."""
    word = 0
    for i, j in enumerate(order):
        word |= (values[j] & 0xF) << (4 * i)
    return to_int32(word)


def problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g)
    zeros = torch.randint(0, 16, (N, K // G), generator=g)
    scales = torch.rand(N, K // G, generator=g, dtype=torch.float64) * 0.1 + 0.01
    return codes, zeros, scales


def expected(codes, zeros, scales) -> torch.Tensor:
    out = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            out[n, k] = (int(codes[n, k]) - int(zeros[n, k // G])) * float(scales[n, k // G])
    return out


def check(w, ref):
    assert w.shape == (N, K) and w.group_size == G
    got = w.dequantize(torch.float64)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got - ref).abs().max()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq(symmetric, v2):
    codes, zeros, scales = problem(1)
    if symmetric:
        zeros = torch.full_like(zeros, 8)
    qweight = torch.tensor([[pack_words([int(codes[n, 8 * r + i]) for i in range(8)]) for n in range(N)]
                            for r in range(K // 8)], dtype=torch.int32)  # [K/8, N]
    stored = zeros if v2 else zeros - 1  # v1 keeps z - 1 (4 bits: z = 0 wraps to 15 and reads back as 16)
    qzeros = torch.tensor([[pack_words([int(stored[8 * c + i, grp]) for i in range(8)]) for c in range(N // 8)]
                           for grp in range(K // G)], dtype=torch.int32)  # [K/G, N/8]
    fmt = Int4Format("gptq", G, symmetric, v2)
    w = gptq_to_int4(qweight, qzeros, scales.t().half(), fmt, g_idx=torch.arange(K) // G)
    ref_zeros = zeros.clone()
    if not v2 and not symmetric:
        ref_zeros[zeros == 0] = 16  # what a v1 reader must do with a stored 15
    check(w, expected(codes, ref_zeros, scales.half().double()))


def test_gptq_act_order_g_idx_refused():
    codes, zeros, scales = problem(2)
    qweight = torch.zeros(K // 8, N, dtype=torch.int32)
    with pytest.raises(UnsupportedQuantization, match="act-order"):
        gptq_to_int4(qweight, torch.zeros(K // G, N // 8, dtype=torch.int32), scales.t().half(),
                     Int4Format("gptq", G, True), g_idx=torch.randperm(K) // G)


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_interleaved_order(symmetric):
    codes, zeros, scales = problem(3)
    qweight = torch.tensor([[pack_words([int(codes[n, k]) for n in range(8 * c, 8 * c + 8)], AWQ_PACK_ORDER)
                             for c in range(N // 8)] for k in range(K)], dtype=torch.int32)  # [K, N/8]
    qzeros = torch.tensor([[pack_words([int(zeros[n, grp]) for n in range(8 * c, 8 * c + 8)], AWQ_PACK_ORDER)
                            for c in range(N // 8)] for grp in range(K // G)], dtype=torch.int32)
    w = awq_to_int4(qweight, qzeros, scales.t().float(), Int4Format("awq", G, symmetric))
    check(w, expected(codes, torch.full_like(zeros, 8) if symmetric else zeros, scales.float().double()))


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_pack_quantized(symmetric):
    codes, zeros, scales = problem(4)
    signed = codes - 8  # compressed-tensors quantizes to [-8, 7] and stores value + 8
    packed = torch.tensor([[pack_words([int(signed[n, 8 * c + i]) + 8 for i in range(8)]) for c in range(K // 8)]
                           for n in range(N)], dtype=torch.int32)  # [N, K/8]
    zp = None
    if not symmetric:
        zp = torch.tensor([[pack_words([int(zeros[8 * r + i, grp]) - 8 + 8 for i in range(8)])
                            for grp in range(K // G)] for r in range(N // 8)], dtype=torch.int32)  # [N/8, K/G]
    w = compressed_tensors_to_int4(packed, scales.bfloat16(), Int4Format("compressed-tensors", G, symmetric),
                                   weight_zero_point=zp, weight_shape=torch.tensor([N, K]))
    check(w, expected(codes, torch.full_like(zeros, 8) if symmetric else zeros, scales.bfloat16().double()))


def test_parse_and_refusals():
    cfg = lambda q: {"model_type": "mixtral", "quantization_config": q}  # noqa: E731
    assert parse_int4_checkpoint({"model_type": "mixtral"}) is None
    assert parse_int4_checkpoint(cfg({"quant_method": "fp8"})) is None
    assert parse_int4_checkpoint(cfg({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                      "sym": False, "checkpoint_format": "gptq_v2"})) == Int4Format("gptq", 128, False, True)
    assert parse_int4_checkpoint(cfg({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                      "version": "gemm"})) == Int4Format("awq", 64, False)
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": 128}, "input_activations": None}}}
    assert parse_int4_checkpoint(cfg(ct)) == Int4Format("compressed-tensors", 128, True)
    bad = [({"quant_method": "gptq", "bits": 4, "desc_act": True}, "desc_act true"),
           ({"quant_method": "gptq", "bits": 3}, "gptq bits 3"),
           ({"quant_method": "gptq", "bits": 8}, "gptq bits 8"),
           ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv'"),
           ({"quant_method": "hqq"}, "quant_method 'hqq'"),
           ({"quant_method": "gguf"}, "quant_method 'gguf'"),
           ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
           ({**ct, "format": "float-quantized"}, "format 'float-quantized'")]
    for q, what in bad:
        with pytest.raises(UnsupportedQuantization, match=what) as e:
            parse_int4_checkpoint(cfg(q))
        assert "supported 4-bit checkpoints: gptq" in str(e.value) and "compressed-tensors" in str(e.value)
