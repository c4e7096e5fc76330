"""One rank's side of an FSE-DP MoE layer: all-gather the token counts, plan, run the rounds.

Three lanes per rank. Load: host-to-device copies of the slices this rank loads first (a side CUDA stream on a
GPU; on CPU a memcpy issued in order). Compute: the partial output of this rank's tokens from each slice it
holds, accumulated in fp32 (the grouped-expert function over a one-slot pool). Send/receive: each round's
point-to-point operations posted together (``torch.distributed.batch_isend_irecv``: NCCL groups them, gloo
runs them asynchronously) once the slices that go on are computed, so they overlap the computes of the slices
whose path ends here, and waited at the end of the round, after which the slots of the slices computed in that
round are free again. Round t's loads and receives fill slots for round t + 1, so they proceed while round t
computes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from klotski.distributed.schedule import LOADERS, LayerSchedule, SliceTask, plan_layer
from klotski.distributed.slices import HostSlices, SlotPool, slice_numel, split_slice


class ExpertStreamer:
    """Runs the routed experts of MoE layers for this rank's tokens; every rank of ``group`` must call
    :meth:`run_layer` for the same layers in the same order (ranks with no tokens pass T = 0).

    ``log``: None, or a list that receives (layer, counts [ranks][experts]) of every layer run (set it to ``[]``
    to record; off by default, so a long run keeps no per-step history). ``layers_run`` counts them.
    """

    def __init__(self, host: HostSlices, slots: int, device: torch.device, experts_fn, activation: str,
                 group=None, loader: str = "balanced"):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1 (slice buffers per rank), got {slots!r}")
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
        self.host, self.slots, self.device, self.loader = host, slots, device, loader
        self.experts_fn, self.activation, self.group = experts_fn, activation, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.pool = SlotPool(slots, host.max_slice_numel, host.dtype, device)
        self.load_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.log: list[tuple[int, list[list[int]]]] | None = None
        self.layers_run = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        # what replicated offloading would have read over this rank's host link: every expert its tokens need
        self.replicated_host_bytes = 0
        self._expert_bytes = 3 * host.intermediate * host.hidden * torch.empty(0, dtype=host.dtype).element_size()

    def gather_counts(self, topk_ids: torch.Tensor) -> list[list[int]]:
        """topk_ids [T, k] of this rank -> [ranks][experts] token-expert pairs (all-gathered)."""
        E = self.host.num_experts
        local = torch.bincount(topk_ids.reshape(-1).to(torch.int64), minlength=E).to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return [p.tolist() for p in parts]

    def run_layer(self, layer: int, h: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """h [T, H], topk_weights / topk_ids [T, k] of this rank -> routed output fp32 [T, H]."""
        counts = self.gather_counts(topk_ids)
        self.layers_run += 1
        if self.log is not None:
            self.log.append((layer, counts))
        self.replicated_host_bytes += self._expert_bytes * sum(c > 0 for c in counts[self.rank])
        sched = plan_layer(counts, self.host.num_slices, self.slots, self.loader)
        out = torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        self._execute(layer, sched, h, topk_weights, topk_ids, out)
        return out

    # ---- lanes ---------------------------------------------------------------------------------------------
    def _buffer(self, slot: int, task: SliceTask) -> torch.Tensor:
        return self.pool.buffers[slot][: slice_numel(self.host.hidden, self.host.width(task.slice))]

    def _load(self, layer: int, task: SliceTask, slot: int):
        """Host -> slot on the load lane; returns what the compute lane waits on (a CUDA event, or None)."""
        buf = self.pool.buffers[slot]
        if self.load_stream is None:
            self.host.load(layer, task.expert, task.slice, buf)
            return None
        freed = self.pool.free_events.pop(slot, None)
        if freed is not None:
            self.load_stream.wait_event(freed)
        with torch.cuda.stream(self.load_stream):
            self.host.load(layer, task.expert, task.slice, buf)
            done = torch.cuda.Event()
            done.record(self.load_stream)
        return done

    def _compute(self, task: SliceTask, slot: int, h, topk_weights, topk_ids, out) -> None:
        w13, w2 = split_slice(self._buffer(slot, task), self.host.hidden, self.host.width(task.slice))
        table = torch.full((self.host.num_experts,), -1, dtype=torch.int32, device=h.device)
        table[task.expert] = 0
        self.experts_fn(h, w13[None], w2[None], topk_weights, topk_ids, expert_slots=table, out=out,
                        activation=self.activation)

    def _compute_all(self, tasks, held, ready, h, topk_weights, topk_ids, out) -> None:
        for task in tasks:
            key = (task.expert, task.slice)
            event = ready.pop(key, None)
            if event is not None:  # its host load, on the load lane
                torch.cuda.current_stream(self.device).wait_event(event)
            self._compute(task, held[key], h, topk_weights, topk_ids, out)

    def _tag(self, task: SliceTask) -> int:
        return task.expert * self.host.num_slices + task.slice

    def _execute(self, layer: int, sched: LayerSchedule, h, topk_weights, topk_ids, out) -> None:
        held: dict[tuple[int, int], int] = {}  # (expert, slice) -> slot
        ready: dict[tuple[int, int], object] = {}  # (expert, slice) -> load event to wait on
        for ops in sched.rank_rounds(self.rank):
            for task in ops.loads:  # fill slots for the next round
                key = (task.expert, task.slice)
                held[key] = self.pool.acquire(f"layer {layer} load {key}")
                ready[key] = self._load(layer, task, held[key])
            # slices that go on first, so their sends overlap the computes of the slices ending here
            onward = {(t.expert, t.slice) for t, _ in ops.sends}
            first = [t for t in ops.computes if (t.expert, t.slice) in onward]
            last = [t for t in ops.computes if (t.expert, t.slice) not in onward]
            self._compute_all(first, held, ready, h, topk_weights, topk_ids, out)
            p2p = []
            for task, dst in ops.sends:
                buf = self._buffer(held[(task.expert, task.slice)], task)
                p2p.append(dist.P2POp(dist.isend, buf, dst, self.group, self._tag(task)))
                self.bytes_sent += buf.numel() * buf.element_size()
            for task, src in ops.recvs:
                key = (task.expert, task.slice)
                held[key] = self.pool.acquire(f"layer {layer} receive {key} from rank {src}")
                buf = self._buffer(held[key], task)
                p2p.append(dist.P2POp(dist.irecv, buf, src, self.group, self._tag(task)))
                self.bytes_received += buf.numel() * buf.element_size()
            works = dist.batch_isend_irecv(p2p) if p2p else []
            self._compute_all(last, held, ready, h, topk_weights, topk_ids, out)
            for work in works:
                work.wait()
            for task in ops.computes:  # computed and (where it goes on) sent: the slot is free again
                slot = held.pop((task.expert, task.slice))
                event = None
                if self.load_stream is not None:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(self.device))
                self.pool.release(slot, event)
        if held:
            raise RuntimeError(f"layer {layer}: slices {sorted(held)} were received or loaded but never computed")

    def metrics(self) -> dict:
        return {"host_bytes": self.host.bytes_read, "replicated_host_bytes": self.replicated_host_bytes,
                "d2d_bytes_sent": self.bytes_sent,
                "d2d_bytes_received": self.bytes_received, "peak_slots": self.pool.peak, "slots": self.slots,
                "moe_layers_run": self.layers_run}
