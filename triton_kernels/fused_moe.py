"""Fused MoE expert computation over a slot-addressed weight pool.

``fused_moe_torch`` is the readable reference and the CPU execution path. ``fused_moe`` (same signature) runs
the Triton kernels of ``fused_moe_kernels`` on CUDA tensors or under ``TRITON_INTERPRET=1``, and falls back to
``fused_moe_torch`` on plain CPU, so callers can use ``fused_moe`` everywhere.

Shapes:
    hidden_states  [M, H]
    w13            [S, 2I, H]   slot pool: gate rows [0, I), up rows [I, 2I)
    w2             [S, H, I]
    topk_weights   [M, k]       float
    topk_ids       [M, k]       int (expert ids in [0, E))
    expert_slots   [E] int32    expert id -> slot in [0, S), or -1 (not resident: its pairs are skipped);
                                None means identity (E == S)
    out            [M, H]       when given, the result is *added* into it (and it is returned); its dtype is
                                hidden_states' dtype or fp32

out[m] (+)= sum_j  topk_weights[m, j] * w2[s] @ (act(w13[s, :I] @ x_m) * (w13[s, I:] @ x_m)),
          s = expert_slots[topk_ids[m, j]], over the j whose slot is not -1.

Because the result is added into ``out``, the runtime can call once for the resident (hot) experts and again
for each cold expert as it lands (with the others' slots at -1): every (token, choice) is counted exactly once.

Memory: a call over more than ``chunk_tokens`` tokens (default :data:`CHUNK_TOKENS`) runs in token chunks, so
its workspace (per pair: the intermediate row [I] and the fp32 output row [H]) is bounded by a chunk, not by
the prompt: a long prefill of a large batch group needs no more transient memory than one chunk.

int4 experts: ``w13`` and ``w2`` may instead be :class:`klotski.quant.Int4Weight` stacks (codes [S, N, K/2]
uint8 packed along K, group-wise scales and optional zero points; see :mod:`klotski.quant.int4`) of the same
logical shapes. The Triton path dequantizes each weight tile in the GEMM main loop
(:mod:`.fused_moe_int4_kernels`); the torch path dequantizes one slot at a time. Both compute in
hidden_states' dtype over exactly the weights :func:`klotski.quant.dequantize_int4` gives.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from klotski.quant.int4 import Int4Weight

from .config import INT4_DTYPE, device_name_of, packaged_configs, check_config
from .moe_align import align_unchecked
from .validation import ACTIVATIONS, MoEShape, check_moe_inputs

__all__ = ["fused_moe", "fused_moe_torch", "invoke_fused_moe", "interpreter_enabled", "ACTIVATIONS",
           "CHUNK_TOKENS", "workspace_bytes"]

CHUNK_TOKENS = 16384  # tokens per chunk of one call (vLLM's fused_moe chunks at 32768)


def workspace_bytes(num_tokens: int, top_k: int, hidden_size: int, intermediate_size: int, dtype_bytes: int,
                    chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Transient device bytes of one ``fused_moe`` call: per (token, choice) pair of one chunk the
    intermediate row [I] in the input dtype and the weighted output row [H] in fp32."""
    pairs = min(num_tokens, max(1, chunk_tokens)) * top_k
    return pairs * (intermediate_size * dtype_bytes + hidden_size * 4)


def _output(hidden_states: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(the tensor results go into, whether they are added to it): ``out`` when given, else a new one."""
    return (torch.empty_like(hidden_states), False) if out is None else (out, True)


def _chunks(num_tokens: int, chunk_tokens: int | None):
    step = max(1, CHUNK_TOKENS if chunk_tokens is None else int(chunk_tokens))
    return [(a, min(a + step, num_tokens)) for a in range(0, num_tokens, step)]


def apply_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def resolve_slots(topk_ids: torch.Tensor, expert_slots: torch.Tensor | None) -> torch.Tensor:
    """[M, k] slot of every (token, choice) pair; -1 where the expert is not resident."""
    if expert_slots is None:
        return topk_ids.long()
    return expert_slots.long()[topk_ids.long()]


def fused_moe_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_slots: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    activation: str = "silu",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Reference grouped-expert MoE: a loop over the slots that have tokens. Returns ``out`` ([M, H]).

    Matmuls run in the weights' dtype (as transformers does); the combine across the k choices accumulates
    in fp32 and is cast once to the output dtype. Tokens run in chunks of ``chunk_tokens``.
    """
    shape = check_moe_inputs(hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, out, activation)
    out, accumulate = _output(hidden_states, out)
    for a, b in _chunks(shape.num_tokens, chunk_tokens):
        acc = _moe_chunk_torch(hidden_states[a:b], w13, w2, topk_weights[a:b], topk_ids[a:b], expert_slots,
                               shape.intermediate_size, activation)
        if accumulate:
            out[a:b].add_(acc.to(out.dtype))
        else:
            out[a:b].copy_(acc)
    return out


def _moe_chunk_torch(hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, inter: int,
                     activation: str) -> torch.Tensor:
    """fp32 [M, H]: the MoE output of one chunk of tokens (inputs already checked)."""
    M, H, k = hidden_states.shape[0], hidden_states.shape[1], topk_ids.shape[1]
    slots = resolve_slots(topk_ids, expert_slots)  # [M, k]
    acc = torch.zeros(M, H, dtype=torch.float32, device=hidden_states.device)
    flat_slots = slots.reshape(-1)
    order = torch.argsort(flat_slots, stable=True)
    sorted_slots = flat_slots[order]
    present, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    start = 0
    for slot, count in zip(present.tolist(), counts.tolist()):
        pairs = order[start : start + count]
        start += count
        if slot < 0:
            continue
        token_idx = pairs // k
        x = hidden_states[token_idx]
        gate_up = x @ slot_weight(w13, slot, x.dtype).t()  # [n, 2I]
        h = apply_activation(gate_up[:, :inter], activation) * gate_up[:, inter:]
        y = h @ slot_weight(w2, slot, x.dtype).t()  # [n, H]
        y = y * topk_weights.reshape(-1)[pairs, None].to(y.dtype)
        acc.index_add_(0, token_idx, y.float())
    return acc


def slot_weight(w, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """One slot's weight [N, K] for the matmul: the pool's tensor, or an int4 slot dequantized into ``dtype``
    (into the pool's scratch buffer on the host: used before the next slot of the same pool is dequantized)."""
    return w[slot].dequantize(dtype, reuse=True) if isinstance(w, Int4Weight) else w[slot]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set (read at call time, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_slots: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    activation: str = "silu",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Fused grouped-GEMM MoE (see the module docstring). Returns ``out`` ([M, H]).

    Runs the Triton kernels on CUDA tensors or under ``TRITON_INTERPRET=1``; otherwise ``fused_moe_torch``.
    """
    if not (hidden_states.is_cuda or interpreter_enabled()):
        return fused_moe_torch(hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, out, activation,
                               chunk_tokens=chunk_tokens)
    return invoke_fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, out, activation,
                            chunk_tokens=chunk_tokens)


def invoke_fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_slots: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    activation: str = "silu",
    config: dict | None = None,
    check_values: bool = True,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The Triton path of :func:`fused_moe`, with an optional explicit kernel ``config`` (for the tuner).

    ``check_values=False`` skips checking that expert ids and slots are in range, which costs one host sync per
    call on a GPU (it is skipped anyway during CUDA-graph capture). Only for callers that built ``topk_ids`` and
    ``expert_slots`` themselves: an out-of-range slot then reads outside the weight pool.
    """
    shape = check_moe_inputs(hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, out, activation,
                             check_values=check_values)
    interpret = interpreter_enabled()
    if not (interpret or hidden_states.is_cuda):
        raise ValueError(
            f"the Triton path needs CUDA tensors or TRITON_INTERPRET=1, got tensors on {hidden_states.device}; "
            "fused_moe falls back to fused_moe_torch there"
        )
    chunks = _chunks(shape.num_tokens, chunk_tokens)
    if config is None:
        device_name = device_name_of(hidden_states.device, interpret)
        longest = max((b - a for a, b in chunks), default=0)
        int4 = isinstance(w13, Int4Weight)
        config = packaged_configs().lookup(
            longest, shape.num_experts, shape.intermediate_size, shape.top_k, device_name,
            dtype_bytes=hidden_states.element_size() if int4 else w13.element_size(),
            weight_dtype=INT4_DTYPE if int4 else None,
        )
    else:
        config = check_config(config)
    out_tensor, accumulate = _output(hidden_states, out)
    for a, b in chunks:
        part = replace(shape, num_tokens=b - a)
        _launch(hidden_states[a:b], w13, w2, topk_weights[a:b], topk_ids[a:b], expert_slots, out_tensor[a:b],
                accumulate, activation, part, config, interpret)
    return out_tensor


def _launch(
    hidden_states, w13, w2, topk_weights, topk_ids, expert_slots, out, accumulate,
    activation: str, shape: MoEShape, config: dict, interpret: bool,
) -> None:
    import triton

    from .fused_moe_kernels import GELU_TANH, SILU, build_kernels

    kernels = build_kernels(interpret)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    M, H, inter, k, P = shape.num_tokens, shape.hidden_size, shape.intermediate_size, shape.top_k, shape.num_pairs
    sorted_ids, expert_ids, num_post_pad = align_unchecked(topk_ids, block_m, shape.num_experts, expert_slots)
    # Row blocks to launch: the static bound (no host sync, CUDA-graph safe), or under the interpreter, where
    # every launched program costs milliseconds even when it exits at once, the blocks actually used.
    rows_padded = int(num_post_pad.item()) if interpret else sorted_ids.numel()
    has_slots = expert_slots is not None
    slots_arg = expert_slots if has_slots else expert_ids  # an unused pointer when HAS_SLOTS is False
    dtype = hidden_states.dtype
    upcast = interpret and dtype == torch.bfloat16  # the interpreter has no bf16 arithmetic
    precision = "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for fp16/bf16
    device = hidden_states.device

    inter_cache = torch.empty(P, inter, dtype=dtype, device=device)  # act(gate) * up per pair
    y = torch.empty(P, H, dtype=torch.float32, device=device)  # weighted expert output per pair
    weights = topk_weights.reshape(-1)
    num_row_blocks = triton.cdiv(rows_padded, block_m)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"], **launch)
    routing = (sorted_ids, expert_ids, slots_arg, num_post_pad)

    if isinstance(w13, Int4Weight):
        from .fused_moe_int4_kernels import build_int4_kernels

        int4_kernels = build_int4_kernels(interpret)
        z13 = w13.zeros if w13.zeros is not None else w13.qweight  # an unused pointer when HAS_ZEROS is False
        z2 = w2.zeros if w2.zeros is not None else w2.qweight
        int4_kernels.gemm1_act[(num_row_blocks * triton.cdiv(inter, block_n),)](
            hidden_states, w13.qweight, w13.scales, z13, inter_cache, *routing,
            P, rows_padded, inter, H,
            hidden_states.stride(0), w13.qweight.stride(0), w13.qweight.stride(1), w13.scales.stride(0),
            w13.scales.stride(1), z13.stride(0), z13.stride(1), inter_cache.stride(0),
            GROUP=w13.group_size, HAS_ZEROS=w13.zeros is not None,
            TOP_K=k, HAS_SLOTS=has_slots, ACTIVATION=SILU if activation == "silu" else GELU_TANH,
            UPCAST=upcast, INPUT_PRECISION=precision, **tiles,
        )
        int4_kernels.gemm2_weight[(num_row_blocks * triton.cdiv(H, block_n),)](
            inter_cache, w2.qweight, w2.scales, z2, y, weights, *routing,
            P, rows_padded, H, inter,
            inter_cache.stride(0), w2.qweight.stride(0), w2.qweight.stride(1), w2.scales.stride(0),
            w2.scales.stride(1), z2.stride(0), z2.stride(1), y.stride(0),
            GROUP=w2.group_size, HAS_ZEROS=w2.zeros is not None,
            HAS_SLOTS=has_slots, UPCAST=upcast, INPUT_PRECISION=precision, **tiles,
        )
        _combine(kernels, y, topk_ids, slots_arg, out, M, H, k, has_slots, accumulate)
        return

    kernels.gemm1_act[(num_row_blocks * triton.cdiv(inter, block_n),)](
        hidden_states, w13, inter_cache,
        sorted_ids, expert_ids, slots_arg, num_post_pad,
        P, rows_padded, inter, H,
        hidden_states.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), inter_cache.stride(0),
        TOP_K=k, HAS_SLOTS=has_slots, ACTIVATION=SILU if activation == "silu" else GELU_TANH,
        UPCAST=upcast, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"], **launch,
    )
    kernels.gemm2_weight[(num_row_blocks * triton.cdiv(H, block_n),)](
        inter_cache, w2, y, weights,
        sorted_ids, expert_ids, slots_arg, num_post_pad,
        P, rows_padded, H, inter,
        inter_cache.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        HAS_SLOTS=has_slots, UPCAST=upcast, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"], **launch,
    )
    _combine(kernels, y, topk_ids, slots_arg, out, M, H, k, has_slots, accumulate)


def _combine(kernels, y, topk_ids, slots_arg, out, M: int, H: int, k: int, has_slots: bool,
             accumulate: bool) -> None:
    """out (+)= the sum over the k choices of the per-pair outputs ``y`` [P, H] (fp32)."""
    import triton

    block_h = min(1024, triton.next_power_of_2(H))
    block_t = max(1, min(triton.next_power_of_2(M), 4096 // block_h))
    kernels.combine[(triton.cdiv(M, block_t), triton.cdiv(H, block_h))](
        y, topk_ids, slots_arg, out,
        M, H,
        TOP_K=k, HAS_SLOTS=has_slots, ACCUMULATE=accumulate, BLOCK_T=block_t, BLOCK_H=block_h,
        num_warps=4,
    )
