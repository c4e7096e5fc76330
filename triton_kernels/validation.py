"""Input checks shared by the Triton kernels and their torch references.

Every check raises ``ValueError`` naming the tensor, what was expected and what was given. Shape, dtype,
device and layout checks read only tensor metadata. Value checks (expert ids in ``[0, E)``, slots in
``[-1, S)``) need the values: they cost one host sync on a GPU and are skipped while a CUDA graph is being
captured (a sync is illegal there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.quant.int4 import Int4Weight

ACTIVATIONS = ("silu", "gelu")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class MoEShape:
    """Problem size of one fused_moe call."""

    num_tokens: int  # M
    hidden_size: int  # H
    intermediate_size: int  # I
    num_slots: int  # S
    num_experts: int  # E (len(expert_slots), or S without a slot table)
    top_k: int  # k

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_slots: torch.Tensor | None = None,
    num_slots: int | None = None,
    check_values: bool = True,
) -> None:
    """Check ``topk_ids`` [M, k] against ``num_experts`` and the optional slot table ``expert_slots`` [E].

    ``check_values=False`` skips the value ranges (and so the host sync on a GPU) for callers that built the
    routing and the slot table themselves."""
    if not isinstance(topk_ids, torch.Tensor):
        raise ValueError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [M, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids must be contiguous, got strides {topk_ids.stride()}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    top_k = topk_ids.shape[1]
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k (topk_ids.shape[1]) must be in [1, num_experts={num_experts}], got {top_k}")
    if expert_slots is not None:
        if not isinstance(expert_slots, torch.Tensor):
            raise ValueError(f"expert_slots must be a torch.Tensor or None, got {type(expert_slots).__name__}")
        if expert_slots.dim() != 1 or expert_slots.shape[0] != num_experts:
            raise ValueError(
                f"expert_slots must have shape [num_experts={num_experts}], got {tuple(expert_slots.shape)}"
            )
        if expert_slots.dtype not in INDEX_DTYPES:
            raise ValueError(f"expert_slots must be int32 or int64, got {expert_slots.dtype}")
        if not expert_slots.is_contiguous():
            raise ValueError(f"expert_slots must be contiguous, got strides {expert_slots.stride()}")
        if expert_slots.device != topk_ids.device:
            raise ValueError(f"expert_slots is on {expert_slots.device} but topk_ids is on {topk_ids.device}")
    if not check_values or topk_ids.numel() == 0 or _capturing(topk_ids):
        return
    bounds = [topk_ids.min(), topk_ids.max()]
    if expert_slots is not None:
        bounds += [expert_slots.min().to(topk_ids.dtype), expert_slots.max().to(topk_ids.dtype)]
    lo, hi, *slot_bounds = torch.stack(bounds).tolist()  # one host sync
    if lo < 0 or hi >= num_experts:
        source = " (num_experts = len(expert_slots))" if expert_slots is not None else ""
        raise ValueError(f"topk_ids must lie in [0, {num_experts}){source}, got values in [{lo}, {hi}]")
    if slot_bounds:
        slot_lo, slot_hi = slot_bounds
        upper = num_slots if num_slots is not None else float("inf")  # the pool size, when known
        if slot_lo < -1 or slot_hi >= upper:
            pool = f"{num_slots} slots" if num_slots is not None else "any slot"
            raise ValueError(
                f"expert_slots must lie in [-1, {upper}) (-1: not resident; {pool}), "
                f"got values in [{slot_lo}, {slot_hi}]"
            )


def check_moe_inputs(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_slots: torch.Tensor | None,
    out: torch.Tensor | None,
    activation: str,
    check_values: bool = True,
) -> MoEShape:
    """Validate one fused_moe call and return its sizes.

    hidden_states [M, H], w13 [S, 2I, H], w2 [S, H, I] share one float dtype (fp32/fp16/bf16) and device, each
    with a unit stride in its last dim; topk_weights [M, k] float and topk_ids [M, k] int32/int64, contiguous;
    expert_slots [E] int32/int64 or None (then E = S); out [M, H], contiguous, in hidden_states' dtype or fp32.
    int4 experts: w13 and w2 are both :class:`~klotski.quant.int4.Int4Weight` stacks of those logical shapes
    (their tensors each with a unit stride in the last dim); the compute dtype is then hidden_states' dtype.
    """
    int4 = [isinstance(w, Int4Weight) for w in (w13, w2)]
    if any(int4) and not all(int4):
        raise ValueError(f"w13 and w2 must both be int4 (Int4Weight) or both tensors, got "
                         f"{type(w13).__name__} and {type(w2).__name__}")
    tensors = {"hidden_states": hidden_states, "topk_weights": topk_weights}
    if not int4[0]:
        tensors.update(w13=w13, w2=w2)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [M, H], got shape {tuple(hidden_states.shape)}")
    if len(w13.shape) != 3:
        raise ValueError(f"w13 must be 3-D [S, 2I, H], got shape {tuple(w13.shape)}")
    if len(w2.shape) != 3:
        raise ValueError(f"w2 must be 3-D [S, H, I], got shape {tuple(w2.shape)}")
    M, H = hidden_states.shape
    S, two_i, w13_h = w13.shape
    if two_i % 2 != 0 or two_i == 0:
        raise ValueError(f"w13.shape[1] must be 2*I (gate rows then up rows), got odd or zero {two_i}")
    inter = two_i // 2
    if w13_h != H:
        raise ValueError(f"w13 must have shape [S, 2I, H={H}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (S, H, inter):
        raise ValueError(f"w2 must have shape [S={S}, H={H}, I={inter}] to match w13, got {tuple(w2.shape)}")
    if S == 0:
        raise ValueError("the weight pool is empty (w13.shape[0] == 0)")
    dtype = hidden_states.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden_states dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    for name, t in (("w13", w13), ("w2", w2)):
        if not int4[0] and t.dtype != dtype:
            raise ValueError(f"{name} dtype must match hidden_states ({dtype}), got {t.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise ValueError(f"topk_ids must have shape [M={M}, k], got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal topk_ids shape {tuple(topk_ids.shape)}"
        )
    device = hidden_states.device
    for name, t in (("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {device}")
    strided = [("hidden_states", hidden_states)]
    for name, w in (("w13", w13), ("w2", w2)):
        strided += [(f"{name}.{k}", t) for k, t in w.tensors().items()] if int4[0] else [(name, w)]
    for name, t in strided:
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    if not topk_weights.is_contiguous():
        raise ValueError(f"topk_weights must be contiguous, got strides {topk_weights.stride()}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (M, H):
            raise ValueError(f"out must have shape [M={M}, H={H}], got {tuple(out.shape)}")
        if out.dtype not in (dtype, torch.float32):
            raise ValueError(f"out dtype must be {dtype} or torch.float32, got {out.dtype}")
        if out.device != device:
            raise ValueError(f"out is on {out.device} but hidden_states is on {device}")
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if expert_slots is None:
        num_experts = S
    elif isinstance(expert_slots, torch.Tensor) and expert_slots.dim() == 1:
        num_experts = expert_slots.shape[0]
    else:
        got = tuple(expert_slots.shape) if isinstance(expert_slots, torch.Tensor) else type(expert_slots).__name__
        raise ValueError(f"expert_slots must be a 1-D [E] tensor or None, got {got}")
    check_routing(topk_ids, num_experts, expert_slots, num_slots=S, check_values=check_values)
    return MoEShape(M, H, inter, S, num_experts, topk_ids.shape[1])
