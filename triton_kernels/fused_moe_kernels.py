"""Triton kernels of ``fused_moe``: two grouped GEMMs over slot-addressed expert weights, and the k-combine.

Pairs ``p = m * k + j`` (token m, choice j) arrive grouped by expert in blocks of BLOCK_M (``moe_align``); a
block's expert id goes through the ``expert_slots`` table to the weight-pool slot.

    gemm1_act      inter[p, n] = act(x[m] . w13[s, n]) * (x[m] . w13[s, I + n])        n < I
    gemm2_weight   y[p, h]     = topk_weights[p] * (inter[p] . w2[s, h])  (fp32)        h < H
    combine        out[m, h]  (+)= sum_j y[m*k + j, h] over resident choices j           (fp32 sum, one cast)

The functions are plain Python; :func:`build_kernels` wraps them for the compiler or for the CPU interpreter
(``TRITON_INTERPRET=1``), so one process can use either. For that they call only Triton builtins, never the
``@triton.jit`` helpers of ``triton.language.standard`` (``tl.zeros``, ``tl.cdiv``, ``tl.sigmoid``...): those
are wrapped for one mode when Triton is first imported, and the interpreter re-patches them on every call.
Under the interpreter bf16 tiles are upcast to fp32 on load (``UPCAST``): it has no bf16 arithmetic, and the
rest of the code is the same.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import triton
import triton.language as tl

SILU, GELU_TANH = 0, 1


def gemm1_act_kernel(
    x_ptr, w13_ptr, inter_ptr,
    sorted_ids_ptr, expert_ids_ptr, slots_ptr, num_post_pad_ptr,
    num_pairs, num_rows_padded, inter_size, hidden_size,
    stride_xm, stride_ws, stride_wn, stride_wk, stride_im,
    TOP_K: tl.constexpr, HAS_SLOTS: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Block (pid_m, pid_n) of inter [P, I], with GROUP_M row blocks swept together for weight reuse in L2.
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

    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    pair_mask = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + expert).to(tl.int64)
    else:
        slot = expert
    token = pair // TOP_K

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    gate_ptrs = w13_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    up_ptrs = gate_ptrs + inter_size * stride_wn

    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (hidden_size + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < hidden_size - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        gate_w = tl.load(gate_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        up_w = tl.load(up_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            gate_w = gate_w.to(tl.float32)
            up_w = up_w.to(tl.float32)
        acc_gate = tl.dot(x, gate_w, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up_w, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    # Epilogue: activation-and-multiply in fp32.
    # (sigmoid spelt out: see the module docstring)
    if ACTIVATION == 0:  # silu: g * sigmoid(g)
        act = acc_gate / (1.0 + tl.exp(-acc_gate))
    else:  # gelu, tanh approximation: 0.5 g (1 + tanh(u)) = g * sigmoid(2u)
        u = 0.7978845608028654 * (acc_gate + 0.044715 * acc_gate * acc_gate * acc_gate)
        act = acc_gate / (1.0 + tl.exp(-2.0 * u))
    h = act * acc_up
    inter_ptrs = inter_ptr + pair[:, None] * stride_im + offs_n[None, :]
    tl.store(inter_ptrs, h.to(inter_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


def gemm2_weight_kernel(
    inter_ptr, w2_ptr, y_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, slots_ptr, num_post_pad_ptr,
    num_pairs, num_rows_padded, hidden_size, inter_size,
    stride_im, stride_ws, stride_wn, stride_wk, stride_ym,
    HAS_SLOTS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Block (pid_m, pid_n) of y [P, H] = inter [P, I] @ w2[s]^T, times the routing weight, stored in fp32.
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
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pair[:, None] * stride_im + offs_k[None, :]
    w_ptrs = w2_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (inter_size + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < inter_size - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the routing weight, in fp32.
    weight = tl.load(topk_weights_ptr + pair, mask=pair_mask, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + pair[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=pair_mask[:, None] & n_mask[None, :])


def combine_kernel(
    y_ptr, topk_ids_ptr, slots_ptr, out_ptr,
    num_tokens, hidden_size,
    TOP_K: tl.constexpr, HAS_SLOTS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # out[t-block, h-block] (+)= sum over resident choices j of y[t*k + j, h-block]; one fp32 sum, one cast.
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < num_tokens
    h_mask = offs_h < hidden_size
    acc = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        row_mask = t_mask
        if HAS_SLOTS:  # a non-resident choice was never computed: read nothing of it
            expert = tl.load(topk_ids_ptr + offs_t * TOP_K + j, mask=t_mask, other=0).to(tl.int64)
            row_mask = t_mask & (tl.load(slots_ptr + expert, mask=t_mask, other=-1) >= 0)
        y_ptrs = y_ptr + (offs_t * TOP_K + j)[:, None] * hidden_size + offs_h[None, :]
        acc += tl.load(y_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
    out_ptrs = out_ptr + offs_t[:, None] * hidden_size + offs_h[None, :]
    mask = t_mask[:, None] & h_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class KernelSet:
    """The three kernels wrapped for one execution mode."""

    gemm1_act: object
    gemm2_weight: object
    combine: object
    interpret: bool


@functools.lru_cache(maxsize=2)
def build_kernels(interpret: bool) -> KernelSet:
    """Wrap the kernel functions for the compiler (``interpret=False``) or the CPU interpreter."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = triton.JITFunction
    return KernelSet(
        gemm1_act=wrap(gemm1_act_kernel),
        gemm2_weight=wrap(gemm2_weight_kernel),
        combine=wrap(combine_kernel),
        interpret=interpret,
    )
