"""Triton kernels of ``fused_moe`` over int4 expert weights (w4a16: 4-bit weights, 16/32-bit activations).

The same two grouped GEMMs as :mod:`.fused_moe_kernels` (whose ``combine`` kernel sums the k choices), with
each weight tile dequantized in the GEMM main loop from the int4 slot layout of :mod:`klotski.quant.int4`:

    qweight [S, N, K/2] uint8   (column 2j in the low nibble of byte j, 2j+1 in the high nibble)
    scales  [S, N, K/G] float,  zeros [S, N, K/G] uint8 (HAS_ZEROS) or the symmetric zero point 8
    tile[k, n] = (code - zero) * scale   in fp32, then cast to the activations' dtype (fp32 under UPCAST)

so the products are those of the dense kernels over the weights :func:`klotski.quant.dequantize_int4` gives;
accumulation is fp32. Each byte of a tile is loaded for both of its columns (k // 2) and shifted by
4 * (k % 2); each scale / zero is gathered per element (k // G), which works for any even group size.

    gemm1_act_int4     inter[p, n] = act(x[m] . W13[s, n]) * (x[m] . W13[s, I + n])
    gemm2_weight_int4  y[p, h]     = topk_weights[p] * (inter[p] . W2[s, h])       (fp32)

Plain functions (see :mod:`.fused_moe_kernels` for why): :func:`build_int4_kernels` wraps them for the
compiler or the interpreter.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import triton
import triton.language as tl


def gemm1_act_int4_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, inter_ptr,
    sorted_ids_ptr, expert_ids_ptr, slots_ptr, num_post_pad_ptr,
    num_pairs, num_rows_padded, inter_size, hidden_size,
    stride_xm, stride_qs, stride_qn, stride_ss, stride_sn, stride_zs, stride_zn, stride_im,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    TOP_K: tl.constexpr, HAS_SLOTS: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (num_rows_padded + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (inter_size + BLOCK_N - 1) // BLOCK_N
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return

    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_mask = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + expert).to(tl.int64)
    else:
        slot = expert
    token = pair // TOP_K

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter_size
    gate_rows = offs_n.to(tl.int64)
    up_rows = gate_rows + inter_size
    offs_k = tl.arange(0, BLOCK_K)
    q_base = q_ptr + slot * stride_qs
    s_base = s_ptr + slot * stride_ss
    z_base = z_ptr + slot * stride_zs

    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (hidden_size + BLOCK_K - 1) // BLOCK_K):
        kk = k0 * BLOCK_K + offs_k  # [BK]
        k_mask = kk < hidden_size
        w_mask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + token[:, None] * stride_xm + kk[None, :], mask=pair_mask[:, None] & k_mask[None, :],
                    other=0.0)
        shift = (kk[:, None] % 2) * 4
        grp = kk[:, None] // GROUP
        # gate tile [BK, BN]
        byte = tl.load(q_base + gate_rows[None, :] * stride_qn + kk[:, None] // 2, mask=w_mask, other=0)
        code = ((byte.to(tl.int32) >> shift) & 15).to(tl.float32)
        scale = tl.load(s_base + gate_rows[None, :] * stride_sn + grp, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_base + gate_rows[None, :] * stride_zn + grp, mask=w_mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        gate_w = (code - zero) * scale
        # up tile [BK, BN]
        byte = tl.load(q_base + up_rows[None, :] * stride_qn + kk[:, None] // 2, mask=w_mask, other=0)
        code = ((byte.to(tl.int32) >> shift) & 15).to(tl.float32)
        scale = tl.load(s_base + up_rows[None, :] * stride_sn + grp, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_base + up_rows[None, :] * stride_zn + grp, mask=w_mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        up_w = (code - zero) * scale
        if UPCAST:
            x = x.to(tl.float32)
        else:
            gate_w = gate_w.to(x_ptr.dtype.element_ty)
            up_w = up_w.to(x_ptr.dtype.element_ty)
        acc_gate = tl.dot(x, gate_w, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up_w, acc_up, input_precision=INPUT_PRECISION)

    if ACTIVATION == 0:  # silu
        act = acc_gate / (1.0 + tl.exp(-acc_gate))
    else:  # gelu, tanh approximation
        u = 0.7978845608028654 * (acc_gate + 0.044715 * acc_gate * acc_gate * acc_gate)
        act = acc_gate / (1.0 + tl.exp(-2.0 * u))
    h = act * acc_up
    inter_ptrs = inter_ptr + pair[:, None] * stride_im + offs_n[None, :]
    tl.store(inter_ptrs, h.to(inter_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


def gemm2_weight_int4_kernel(
    inter_ptr, q_ptr, s_ptr, z_ptr, y_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, slots_ptr, num_post_pad_ptr,
    num_pairs, num_rows_padded, hidden_size, inter_size,
    stride_im, stride_qs, stride_qn, stride_ss, stride_sn, stride_zs, stride_zn, stride_ym,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_SLOTS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (num_rows_padded + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (hidden_size + BLOCK_N - 1) // BLOCK_N
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return

    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_mask = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + expert).to(tl.int64)
    else:
        slot = expert

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden_size
    rows = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    q_base = q_ptr + slot * stride_qs
    s_base = s_ptr + slot * stride_ss
    z_base = z_ptr + slot * stride_zs

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (inter_size + BLOCK_K - 1) // BLOCK_K):
        kk = k0 * BLOCK_K + offs_k
        k_mask = kk < inter_size
        w_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(inter_ptr + pair[:, None] * stride_im + kk[None, :], mask=pair_mask[:, None] & k_mask[None, :],
                    other=0.0)
        grp = kk[:, None] // GROUP
        byte = tl.load(q_base + rows[None, :] * stride_qn + kk[:, None] // 2, mask=w_mask, other=0)
        code = ((byte.to(tl.int32) >> ((kk[:, None] % 2) * 4)) & 15).to(tl.float32)
        scale = tl.load(s_base + rows[None, :] * stride_sn + grp, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_base + rows[None, :] * stride_zn + grp, mask=w_mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        w = (code - zero) * scale
        if UPCAST:
            a = a.to(tl.float32)
        else:
            w = w.to(inter_ptr.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    weight = tl.load(topk_weights_ptr + pair, mask=pair_mask, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + pair[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=pair_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class Int4KernelSet:
    gemm1_act: object
    gemm2_weight: object
    interpret: bool


@functools.lru_cache(maxsize=2)
def build_int4_kernels(interpret: bool) -> Int4KernelSet:
    """Wrap the int4 kernel functions for the compiler (``interpret=False``) or the CPU interpreter."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = triton.JITFunction
    return Int4KernelSet(gemm1_act=wrap(gemm1_act_int4_kernel), gemm2_weight=wrap(gemm2_weight_int4_kernel),
                         interpret=interpret)
