"""Slot pools on the device: a fixed number of weight slots, granted strictly in schedule order.

:class:`SlotPool` hands out slot indices. A load first takes a *ticket number* (:meth:`SlotPool.reserve`, on
the thread that issues the schedule, so numbers follow the schedule), then a loader thread
:meth:`SlotPool.acquire`\\ s with it: a slot is granted only to the lowest outstanding number. Because the
compute stream consumes slots in the same order, a later prefetch can never starve an earlier load the
compute is waiting for, so the pool cannot deadlock while it has at least one slot. A wait longer than
``timeout_s`` raises :class:`PoolTimeout` naming the pool and its state (two threads driving one executor at
once, or a slot never released, would otherwise hang for ever). ``release`` may carry
a CUDA event recorded after the slot's last use on the compute stream; the next writer waits on it.

:class:`ExpertPool` is the device weight pool ``w13`` [S, 2I, H], ``w2`` [S, H, I] that ``fused_moe``
addresses through ``expert_slots``; the first ``num_pinned`` slots hold GPU-resident experts for good. With
``int4`` (an int4 store's quantization entry) ``w13`` / ``w2`` are :class:`~klotski.quant.Int4Weight` stacks
(codes + scales + zero points, as stored), which ``fused_moe`` computes from directly.
"""
from __future__ import annotations

import heapq
import threading

import torch

from klotski.quant.int4 import Int4Weight


class PoolCancelled(RuntimeError):
    """The pool was cancelled (an interrupted forward); waiting loads give up."""


class PoolTimeout(TimeoutError):
    """A load waited longer than the pool's timeout for its slot."""


class SlotPool:
    def __init__(self, slots: list[int], name: str = "pool", timeout_s: float | None = 600.0):
        self.name = name
        self.timeout_s = timeout_s
        self.capacity = len(slots)
        self._all = list(slots)
        self._free = list(slots)
        self._events: dict[int, object] = {}
        self._pending: list[int] = []
        self._next = 0
        self._cancelled = False
        self._cond = threading.Condition()
        self.min_free = len(slots)

    def reserve(self) -> int:
        """A ticket number fixing this request's place in the grant order."""
        with self._cond:
            n = self._next
            self._next += 1
            heapq.heappush(self._pending, n)
            return n

    def acquire(self, ticket: int) -> tuple[int, object]:
        """Block until ``ticket`` is first in line and a slot is free -> (slot, event to wait on or None)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._cancelled or (self._free and self._pending and self._pending[0] == ticket),
                timeout=self.timeout_s)
            if not ok:
                first = self._pending[0] if self._pending else None
                self._pending.remove(ticket)
                heapq.heapify(self._pending)
                self._cond.notify_all()
                raise PoolTimeout(
                    f"{self.name}: request {ticket} waited {self.timeout_s:g} s for a slot ({len(self._free)} of "
                    f"{self.capacity} free, next in line: request {first}); "
                    f"a slot was never released, or two threads drive one executor at once")
            if self._cancelled:
                raise PoolCancelled(f"{self.name}: cancelled")
            heapq.heappop(self._pending)
            slot = self._free.pop(0)
            self.min_free = min(self.min_free, len(self._free))
            self._cond.notify_all()
            return slot, self._events.pop(slot, None)

    def withdraw(self, ticket: int) -> None:
        """Give up a reserved ticket without taking a slot."""
        with self._cond:
            if ticket in self._pending:
                self._pending.remove(ticket)
                heapq.heapify(self._pending)
                self._cond.notify_all()

    def release(self, slot: int, event=None) -> None:
        with self._cond:
            if slot in self._free or slot not in self._all:
                raise RuntimeError(f"{self.name}: slot {slot} released twice or unknown")
            if event is not None:
                self._events[slot] = event
            self._free.append(slot)
            self._cond.notify_all()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.capacity - len(self._free)

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def reset(self) -> None:
        """All slots free, no tickets outstanding, not cancelled (after an aborted forward)."""
        with self._cond:
            self._free = list(self._all)
            self._pending.clear()
            self._events.clear()
            self._cancelled = False
            self._cond.notify_all()


class ExpertPool:
    """Device weight slots for routed experts: ``w13`` [S, 2I, H], ``w2`` [S, H, I]."""

    def __init__(self, num_slots: int, num_pinned: int, inter: int, hidden: int, dtype, device,
                 timeout_s: float | None = 600.0, int4: dict | None = None):
        self.num_slots = num_slots
        self.num_pinned = num_pinned
        if int4 is None:
            self.w13 = torch.empty(num_slots, 2 * inter, hidden, dtype=dtype, device=device)
            self.w2 = torch.empty(num_slots, hidden, inter, dtype=dtype, device=device)
        else:
            group, sym, scale_dtype = int(int4["group_size"]), bool(int4["symmetric"]), getattr(torch, int4["scale_dtype"])
            self.w13 = Int4Weight.empty((num_slots, 2 * inter, hidden), group, sym, scale_dtype, device)
            self.w2 = Int4Weight.empty((num_slots, hidden, inter), group, sym, scale_dtype, device)
        self.slots = SlotPool(list(range(num_pinned, num_slots)), "expert pool", timeout_s)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes if isinstance(w, Int4Weight) else w.numel() * w.element_size()
                   for w in (self.w13, self.w2))

    @property
    def streaming_slots(self) -> int:
        return self.num_slots - self.num_pinned
