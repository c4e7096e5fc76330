"""Fused MoE expert computation over a slot-addressed weight pool.

``fused_moe_torch`` is the readable reference and the CPU execution path. The Triton kernel ``fused_moe``
(same signature) lives beside it.

Shapes:
    hidden_states  [M, H]
    w13            [S, 2I, H]   slot pool: gate rows [0, I), up rows [I, 2I)
    w2             [S, H, I]
    topk_weights   [M, k]       float
    topk_ids       [M, k]       int (expert ids in [0, E))
    expert_slots   [E] int32    expert id -> slot in [0, S), or -1 (not resident: its pairs are skipped);
                                None means identity (E == S)
    out            [M, H]       when given, the result is *added* into it (and it is returned)

out[m] (+)= sum_j  topk_weights[m, j] * w2[s] @ (act(w13[s, :I] @ x_m) * (w13[s, I:] @ x_m)),
          s = expert_slots[topk_ids[m, j]], over the j whose slot is not -1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


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
) -> torch.Tensor:
    """Reference grouped-expert MoE: a loop over the slots that have tokens. Returns ``out`` ([M, H]).

    Matmuls run in the weights' dtype (as transformers does); the combine across the k choices accumulates
    in fp32 and is cast once to the output dtype.
    """
    M, H = hidden_states.shape
    inter = w2.shape[-1]
    slots = resolve_slots(topk_ids, expert_slots)  # [M, k]
    acc = torch.zeros(M, H, dtype=torch.float32, device=hidden_states.device)
    flat_slots = slots.reshape(-1)
    order = torch.argsort(flat_slots, stable=True)
    sorted_slots = flat_slots[order]
    present, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    k = topk_ids.shape[1]
    start = 0
    for slot, count in zip(present.tolist(), counts.tolist()):
        pairs = order[start : start + count]
        start += count
        if slot < 0:
            continue
        token_idx = pairs // k
        x = hidden_states[token_idx].to(w13.dtype)
        gate_up = x @ w13[slot].t()
        h = apply_activation(gate_up[:, :inter], activation) * gate_up[:, inter:]
        y = h @ w2[slot].t()
        y = y * topk_weights.reshape(-1)[pairs, None].to(y.dtype)
        acc.index_add_(0, token_idx, y.float())
    if out is None:
        return acc.to(hidden_states.dtype)
    out.add_(acc.to(out.dtype))
    return out
