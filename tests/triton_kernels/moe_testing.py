"""Helpers for the kernel tests: random MoE problems, slot tables, relative error, NaN-poisoned allocation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (in fp64); NaN anywhere in ``got`` gives inf."""
    got, ref = got.double().cpu(), ref.double().cpu()
    if torch.isnan(got).any():
        return float("inf")
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


@dataclass
class MoEProblem:
    hidden_states: torch.Tensor  # [M, H]
    w13: torch.Tensor  # [S, 2I, H]
    w2: torch.Tensor  # [S, H, I]
    topk_weights: torch.Tensor  # [M, k]
    topk_ids: torch.Tensor  # [M, k]
    expert_slots: torch.Tensor | None  # [E]

    def args(self, **overrides):
        """Positional arguments of fused_moe (hidden_states ... expert_slots)."""
        fields = dict(hidden_states=self.hidden_states, w13=self.w13, w2=self.w2, topk_weights=self.topk_weights,
                      topk_ids=self.topk_ids, expert_slots=self.expert_slots)
        fields.update(overrides)
        return tuple(fields.values())

    def upcast(self) -> "MoEProblem":
        """The same values in fp32 (for a reference computed at higher precision)."""
        return MoEProblem(self.hidden_states.float(), self.w13.float(), self.w2.float(), self.topk_weights.float(),
                          self.topk_ids, self.expert_slots)


def make_problem(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
    dtype: torch.dtype = torch.float32, slots: str = "identity", seed: int = 0, device: str = "cpu",
    unused_experts: int | None = None,
) -> MoEProblem:
    """A random problem. ``slots``: ``identity`` (no table), ``permuted`` (a shuffled pool with 2 spare slots),
    ``missing`` (permuted, about a third of the experts at -1). ``unused_experts`` experts receive no token
    (default: a quarter of those the top-k leaves room for)."""
    g = torch.Generator().manual_seed(seed)
    num_slots = num_experts if slots == "identity" else num_experts + 2
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_slots, hidden, inter, generator=g) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if unused_experts is None:
        unused_experts = (num_experts - top_k) // 4
    unused = torch.randperm(num_experts, generator=g)[:unused_experts]
    logits[:, unused] = float("-inf")  # these experts get zero tokens
    topk_weights, topk_ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    if slots == "identity":
        expert_slots = None
    else:
        expert_slots = torch.randperm(num_slots, generator=g)[:num_experts].to(torch.int32)
        if slots == "missing":
            missing = torch.randperm(num_experts, generator=g)[: max(1, num_experts // 3)]
            expert_slots[missing] = -1
        elif slots != "permuted":
            raise ValueError(f"unknown slots kind {slots!r}")
    to = dict(device=device)
    return MoEProblem(
        x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
        topk_weights.to(dtype=dtype, **to), topk_ids.to(torch.int32).to(**to),
        None if expert_slots is None else expert_slots.to(**to),
    )


class PoisonedTorch:
    """Stands in for the ``torch`` module inside fused_moe: ``empty``/``empty_like`` float tensors are NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))
