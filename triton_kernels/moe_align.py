"""Group token-expert pairs by expert and pad every group to a multiple of the GEMM block (vLLM semantics).

The grouped GEMMs in ``fused_moe`` walk the pairs one ``block_size`` block at a time; every block belongs to a
single expert, so a program loads that expert's weights once for up to ``block_size`` pairs.

``moe_align_block_size`` is vectorised on the tensors' device with no host sync (so it can be captured in a
CUDA graph); ``moe_align_block_size_torch`` is the readable loop it is checked against (exactly equal).
"""
from __future__ import annotations

import torch

from .validation import check_routing


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Upper bound on ``num_tokens_post_padded``: every non-empty expert wastes at most ``block_size - 1``."""
    return num_pairs + min(num_experts, num_pairs) * (block_size - 1)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the M*k (token, choice) pairs by expert and pad each expert's group to a multiple of ``block_size``.

    Args:
        topk_ids: [M, k] int expert ids in [0, num_experts). Pair ``p = m * k + j`` is token m's j-th choice.
        block_size: rows per GEMM block (BLOCK_M).
        num_experts: E.
        expert_slots: optional [E] int table expert -> slot; experts whose slot is -1 are not resident and
            get no blocks (their pairs do not appear at all).

    Returns:
        sorted_token_ids: [max_padded] int32, ``max_padded = P + min(E, P) * (block_size - 1)`` with P = M*k.
            Pair indices grouped by expert (ascending expert id, ascending pair index inside a group); each
            group is padded to a multiple of ``block_size`` with the sentinel ``P``; the tail past
            ``num_tokens_post_padded`` is sentinel too.
        expert_ids: [ceil(max_padded / block_size)] int32, the expert id of every block; -1 past the last block.
            Experts with no tokens (or slot -1) get no block.
        num_tokens_post_padded: [1] int32, the number of used entries of ``sorted_token_ids``.

    Worked example (M=3, k=2, E=4, block_size=4; P = 6 pairs, sentinel 6)::

        topk_ids = [[2, 0],      pairs: 0->e2  1->e0
                    [0, 1],             2->e0  3->e1
                    [2, 3]]             4->e2  5->e3
        sorted_token_ids = [1, 2, 6, 6,  3, 6, 6, 6,  0, 4, 6, 6,  5, 6, 6, 6,  6, 6]
        expert_ids       = [0, 1, 2, 3, -1]
        num_tokens_post_padded = [16]

        with expert_slots = [0, -1, 1, -1] (experts 1 and 3 not resident):
        sorted_token_ids = [1, 2, 6, 6,  0, 4, 6, 6,  6, 6, 6, 6,  6, 6, 6, 6,  6, 6]
        expert_ids       = [0, 2, -1, -1, -1]
        num_tokens_post_padded = [8]
    """
    _check_block_size(block_size)
    check_routing(topk_ids, num_experts, expert_slots)
    return align_unchecked(topk_ids, block_size, num_experts, expert_slots)


def align_unchecked(
    topk_ids: torch.Tensor, block_size: int, num_experts: int, expert_slots: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`moe_align_block_size` for inputs the caller has already validated (no host sync at all)."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [P]
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    max_blocks = -(-max_padded // block_size)

    # Bucket of every pair: its expert, or the extra bucket E when the expert is not resident.
    if expert_slots is not None:
        resident = expert_slots.long()[flat] >= 0
        bucket = torch.where(resident, flat, torch.full_like(flat, num_experts))
    else:
        bucket = flat
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # [E + 1]
    counts[num_experts] = 0  # the non-resident bucket is dropped: no blocks, no entries

    padded = (counts + block_size - 1) // block_size * block_size  # [E + 1]
    padded_start = torch.cumsum(padded, 0) - padded
    group_start = torch.cumsum(counts, 0) - counts  # start of each bucket in the stably sorted order

    order = torch.sort(bucket, stable=True).indices  # [P] pair indices grouped by bucket
    sorted_bucket = bucket[order]
    rank = torch.arange(num_pairs, device=device) - group_start[sorted_bucket]
    dest = padded_start[sorted_bucket] + rank
    dest = torch.where(sorted_bucket < num_experts, dest, torch.full_like(dest, max_padded))  # dropped -> dump
    sorted_token_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_token_ids = sorted_token_ids[:max_padded]

    block_end = torch.cumsum(padded[:num_experts] // block_size, 0)  # [E]
    block = torch.arange(max_blocks, device=device)
    expert_ids = torch.searchsorted(block_end, block, right=True)
    expert_ids = torch.where(block < block_end[-1], expert_ids, torch.full_like(expert_ids, -1))
    num_tokens_post_padded = padded[:num_experts].sum().reshape(1).to(torch.int32)
    return sorted_token_ids, expert_ids.to(torch.int32), num_tokens_post_padded


def moe_align_block_size_torch(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`moe_align_block_size` (same signature and outputs): a loop over experts."""
    _check_block_size(block_size)
    check_routing(topk_ids, num_experts, expert_slots)
    flat = topk_ids.reshape(-1).cpu().long()
    num_pairs = flat.numel()
    sentinel = num_pairs
    slots = None if expert_slots is None else expert_slots.cpu().tolist()
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for expert in range(num_experts):
        if slots is not None and slots[expert] < 0:
            continue
        pairs = (flat == expert).nonzero().flatten().tolist()  # ascending pair index
        if not pairs:
            continue
        num_blocks = -(-len(pairs) // block_size)
        sorted_ids += pairs + [sentinel] * (num_blocks * block_size - len(pairs))
        expert_ids += [expert] * num_blocks
    used = len(sorted_ids)
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    max_blocks = -(-max_padded // block_size)
    sorted_ids += [sentinel] * (max_padded - used)
    expert_ids += [-1] * (max_blocks - len(expert_ids))
    device = topk_ids.device
    return (
        torch.tensor(sorted_ids, dtype=torch.int32, device=device),
        torch.tensor(expert_ids, dtype=torch.int32, device=device),
        torch.tensor([used], dtype=torch.int32, device=device),
    )
