"""Weight loads: a layer's streamed dense weights into a dense buffer, a routed expert into an expert pool slot.

Each load is issued on a loader lane in schedule order (its pool ticket is reserved on the issuing thread, so
slots are granted in schedule order, :mod:`klotski.runtime.pool`) and returns a
:class:`~klotski.runtime.loader.Ticket`; compute waits on the ticket right before use and gives the buffer or
slot back right after its last use (``release_*``, with a CUDA event the next writer waits on).
"""
from __future__ import annotations

import torch

from klotski.runtime.loader import Lanes, Ticket
from klotski.runtime.pool import SlotPool
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights


def ready(result) -> Ticket:
    """A ticket that is already done (a weight that needs no load)."""
    t = Ticket("ready")
    t.finish(result)
    return t


def compute_event(cuda: bool):
    """A CUDA event recorded on the current (compute) stream; None on CPU."""
    if not cuda:
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def begin_load(pool: SlotPool, ticket: int, ln, tracer: Tracer, w: PlacedWeights):
    """On lane ``ln``: take the reserved buffer (its stream waits until the buffer's last reader is done),
    start the lane's span and its read-seconds count. -> (buffer index, span start)."""
    idx, ev = pool.acquire(ticket)
    if ev is not None:
        ln.stream.wait_event(ev)
    start = tracer.begin(ln.stream)
    w.take_read_seconds()
    return idx, start


class WeightLoads:
    """Dense buffers (a layer's streamed attention / gate / shared weights) and expert slot loads."""

    def __init__(self, w: PlacedWeights, lanes: Lanes, tracer: Tracer, device: torch.device, dense_buffers: int,
                 timeout_s: float | None):
        self.w, self.lanes, self.tracer, self.device = w, lanes, tracer, device
        self.cuda = device.type == "cuda"
        n = max(dense_buffers, 1)
        self.dense_pool = SlotPool(list(range(n)), "dense buffers", timeout_s)
        self.dense_bufs: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]

    @property
    def pools(self) -> list[SlotPool]:
        return [self.dense_pool] + ([self.w.pool.slots] if self.w.pool is not None else [])

    def dense(self, layer: int, lane: str = "prefetch", op_ids: tuple = ()) -> Ticket:
        """The layer's weights as one dict (resident + streamed into a dense buffer) -> (buffer or None, w).
        ``op_ids``: the ops of the step's op list this load executes (logged by the tracer when it runs)."""
        keys = self.w.streamed_keys(layer)
        if not keys:
            return ready((None, self.w.resident[layer]))
        ticket = self.dense_pool.reserve()

        def job(ln):
            self.tracer.log_ops(lane, op_ids)
            idx, start = begin_load(self.dense_pool, ticket, ln, self.tracer, self.w)
            buf = self.dense_bufs[idx]
            for k in [k for k in buf if k not in keys]:
                del buf[k]
            moved = read = 0
            for key, shape in keys.items():
                dt = self.w.buffer_dtype(key)
                if key not in buf or tuple(buf[key].shape) != shape or buf[key].dtype != dt:
                    buf[key] = torch.empty(shape, dtype=dt, device=self.device)
                src = self.w.source(layer, key)
                n = self.w.fill(buf[key], src)
                moved += n
                read += n if isinstance(src, list) else 0  # disk pieces (host copies are tensors / Fp8Weight)
            self.tracer.end(lane, f"L{layer} weights", start, ln.stream, bytes=moved, tier="disk" if read else "cpu",
                            read_bytes=read, read_s=self.w.take_read_seconds())
            return idx, {**self.w.resident[layer], **{k: buf[k] for k in keys}}

        return self.lanes[lane].submit(f"L{layer} weights", job)

    def release_dense(self, idx) -> None:
        if idx is not None:
            self.dense_pool.release(idx, compute_event(self.cuda))

    def expert(self, layer: int, e: int, lane: str, op_ids: tuple = ()) -> Ticket:
        """A routed expert in a device slot -> slot index (resident experts: their permanent slot)."""
        tier, what = self.w.expert_home[(layer, e)]
        if tier == "gpu":
            return ready(what)
        ticket = self.w.pool.slots.reserve()

        def job(ln):
            self.tracer.log_ops(lane, op_ids)
            return self._fill_slot(layer, e, ticket, ln, lane)

        return self.lanes[lane].submit(f"L{layer} e{e}", job)

    def experts(self, layer: int, experts: tuple[int, ...], lane: str, op_ids: tuple = ()) -> Ticket:
        """Several streamed experts of one layer, one after another in one job on ``lane`` -> {expert: slot}.
        Their slots are reserved now, in order."""
        homes = [self.w.expert_home[(layer, e)][0] for e in experts]
        if "gpu" in homes:
            raise ValueError(f"layer {layer}: expert {experts[homes.index('gpu')]} is GPU-resident, not loaded")
        tickets = [self.w.pool.slots.reserve() for _ in experts]

        def job(ln):
            self.tracer.log_ops(lane, op_ids)
            out = {}
            try:
                for e, t in zip(experts, tickets):
                    out[e] = self._fill_slot(layer, e, t, ln, lane)
            except BaseException:
                for slot in out.values():
                    self.w.pool.slots.release(slot)
                for t in tickets[len(out) + 1:]:
                    self.w.pool.slots.withdraw(t)
                raise
            return out

        return self.lanes[lane].submit(f"L{layer} x{len(experts)} experts", job)

    def _fill_slot(self, layer: int, e: int, ticket: int, ln, lane: str) -> int:
        """On lane ``ln``: take the slot reserved as ``ticket`` and fill it with expert ``e`` -> slot."""
        tier, what = self.w.expert_home[(layer, e)]
        pool = self.w.pool
        slot, start = begin_load(pool.slots, ticket, ln, self.tracer, self.w)
        try:
            if tier == "cpu":
                moved = self.w.fill(pool.w13[slot], what[0]) + self.w.fill(pool.w2[slot], what[1])
            elif tier == "store":
                moved = self.w.read_record(what, pool.w13[slot], pool.w2[slot])
            else:
                moved = self.w.fill(pool.w13[slot], what[0]) + self.w.fill(pool.w2[slot], [what[1]])
        except BaseException:
            pool.slots.release(slot)
            raise
        self.tracer.end(lane, f"L{layer} e{e}", start, ln.stream, bytes=moved, tier=tier,
                        read_bytes=moved if tier in ("disk", "store") else 0, read_s=self.w.take_read_seconds())
        return slot

    def release_expert(self, slot: int) -> None:
        if slot >= self.w.pool.num_pinned:
            self.w.pool.slots.release(slot, compute_event(self.cuda))
