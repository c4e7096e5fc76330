"""Expert slices in host memory and the per-rank pool of slot buffers they stream through.

A slice ``s`` of expert ``e`` covers intermediate columns [a, b) (:func:`~klotski.distributed.schedule.slice_bounds`):
its ``w13`` rows are the gate rows [a, b) and the up rows [I + a, I + b) ([2 * (b - a), H]), its ``w2`` columns
[a, b) ([H, b - a]). Host memory keeps each slice as one contiguous flat tensor (w13 slice, then w2 slice), so
loading it is one host-to-device copy and forwarding it one send of the same flat buffer.
"""
from __future__ import annotations

from collections import Counter

import torch

from klotski.distributed.schedule import slice_bounds


def slice_numel(hidden: int, width: int) -> int:
    """Elements of one flat slice of ``width`` intermediate columns: w13 [2 * width, H] + w2 [H, width]."""
    return 3 * width * hidden


def split_slice(flat: torch.Tensor, hidden: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat slice buffer -> (w13 [2 * width, H], w2 [H, width]) views."""
    n13 = 2 * width * hidden
    return flat[:n13].view(2 * width, hidden), flat[n13 : n13 + hidden * width].view(hidden, width)


class HostSlices:
    """Every routed expert of every MoE layer, cut into ``num_slices`` flat host tensors ([3 * width * H] each).

    ``load(layer, expert, slice, out)`` copies one slice into a slot buffer (``non_blocking`` from pinned memory
    on CUDA) and counts it: ``reads[(layer, expert, slice)]`` and ``bytes_read``. ``pin``: page-locked host
    memory (for asynchronous host-to-device copies).
    """

    def __init__(self, weights, dtype: torch.dtype, num_slices: int, pin: bool = False):
        spec = weights.spec
        self.hidden = spec.hidden_size
        self.intermediate = spec.moe_intermediate_size
        self.bounds = slice_bounds(self.intermediate, num_slices)
        self.num_slices = num_slices
        self.num_experts = spec.num_experts
        self.dtype = dtype
        self.slices: dict[int, list[list[torch.Tensor]]] = {}  # layer -> [expert][slice] flat host tensor
        inter = self.intermediate
        for layer in range(spec.num_layers):
            if not spec.is_moe(layer):
                continue
            per_expert = []
            for e in range(spec.num_experts):
                w13, w2 = weights.read_expert(layer, e, dtype)
                if tuple(w13.shape) != (2 * inter, self.hidden) or tuple(w2.shape) != (self.hidden, inter):
                    raise ValueError(f"layer {layer} expert {e}: w13 {list(w13.shape)} / w2 {list(w2.shape)}, "
                                     f"expected [{2 * inter}, {self.hidden}] / [{self.hidden}, {inter}]")
                parts = []
                for a, b in self.bounds:
                    flat = torch.cat([w13[a:b].reshape(-1), w13[inter + a : inter + b].reshape(-1),
                                      w2[:, a:b].reshape(-1)]).to(dtype)
                    parts.append(flat.pin_memory() if pin else flat)
                per_expert.append(parts)
            self.slices[layer] = per_expert
        self.reads: Counter = Counter()
        self.bytes_read = 0

    def width(self, s: int) -> int:
        a, b = self.bounds[s]
        return b - a

    @property
    def max_slice_numel(self) -> int:
        return max(slice_numel(self.hidden, b - a) for a, b in self.bounds)

    def load(self, layer: int, expert: int, s: int, out: torch.Tensor) -> torch.Tensor:
        """Copy slice ``s`` of ``expert`` into ``out`` (a slot buffer, at least the slice's numel) -> the filled
        prefix of ``out``."""
        src = self.slices[layer][expert][s]
        dst = out[: src.numel()]
        dst.copy_(src, non_blocking=src.is_pinned())
        self.reads[(layer, expert, s)] += 1
        self.bytes_read += src.numel() * src.element_size()
        return dst


class SlotPool:
    """``slots`` flat slice buffers on ``device``; ``acquire`` raises if the schedule ever needs more than it
    planned (a bug, never a silent overflow). ``peak`` is the most in use at once."""

    def __init__(self, slots: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(slots)]
        self.free = list(range(slots - 1, -1, -1))
        self.peak = 0
        self.free_events: dict[int, object] = {}  # slot -> CUDA event recorded when it was released

    def acquire(self, what: str) -> int:
        if not self.free:
            raise RuntimeError(f"slot pool exhausted ({len(self.buffers)} slots) acquiring {what}: the schedule "
                               f"broke its slot bound")
        slot = self.free.pop()
        self.peak = max(self.peak, len(self.buffers) - len(self.free))
        return slot

    def release(self, slot: int, event=None) -> None:
        if event is not None:
            self.free_events[slot] = event
        self.free.append(slot)
