"""Memory accounting per tier: what the runtime holds on the device, in host memory and on disk.

A :class:`TierMeter` counts bytes the runtime allocates on one tier (resident weights, pool slots, staging
buffers, KV caches, the batch group's activations) and keeps the peak. Static allocations are checked
against the budget when they are made, so an oversized plan fails before any work with a message that
names the tier, the budget and what is asking for it. On CUDA the device peak is also read from
``torch.cuda.max_memory_allocated`` (see :meth:`TierMeter.measured_peak`).
"""
from __future__ import annotations

import threading

import torch

from klotski.units import format_bytes


class BudgetError(ValueError):
    """A memory budget is too small for what the plan needs on that tier. ``min_gpu_memory`` /
    ``min_cpu_memory``: the smallest budgets the planner would accept (0 when not known)."""

    def __init__(self, message: str, min_gpu_memory: int = 0, min_cpu_memory: int = 0):
        super().__init__(message)
        self.min_gpu_memory, self.min_cpu_memory = min_gpu_memory, min_cpu_memory


def nbytes(t) -> int:
    """Bytes of a tensor, or of an fp8 weight with its scales (:class:`~klotski.model.quant.Fp8Weight`)."""
    if not isinstance(t, torch.Tensor):
        return int(t.nbytes)
    return t.numel() * t.element_size()


class TierMeter:
    """Bytes held on one tier (``name``: "gpu" | "cpu" | "disk") against ``budget`` (None: unlimited)."""

    def __init__(self, name: str, budget: int | None):
        self.name = name
        self.budget = budget
        self.used = 0
        self.peak = 0
        self.items: dict[str, int] = {}
        self._lock = threading.Lock()

    def hold(self, what: str, amount: int, check: bool = True) -> None:
        """Account ``amount`` bytes under ``what``; raises BudgetError past the budget when ``check``."""
        with self._lock:
            if check and self.budget is not None and self.used + amount > self.budget:
                held = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.items.items()) if v)
                raise BudgetError(
                    f"{self.name} memory budget {format_bytes(self.budget)} exceeded: {what} needs "
                    f"{format_bytes(amount)} with {format_bytes(self.used)} already held ({held or 'nothing'})"
                )
            self.used += amount
            self.items[what] = self.items.get(what, 0) + amount
            self.peak = max(self.peak, self.used)

    def free(self, what: str, amount: int) -> None:
        with self._lock:
            self.used -= amount
            self.items[what] = self.items.get(what, 0) - amount

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.used

    def measured_peak(self, device: torch.device) -> int:
        """The peak to report: the accounted peak, or CUDA's allocator peak on a CUDA device tier."""
        if self.name == "gpu" and device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        return self.peak
