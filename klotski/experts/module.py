"""``OffloadedExperts``: one MoE layer's routed experts as a ``torch.nn.Module`` any engine can call.

    group = ExpertOffloadGroup(num_layers, gpu_memory="8GiB", cpu_memory="32GiB")
    experts = OffloadedExperts.from_checkpoint(ckpt_dir, layer, group=group, device="cuda")
    out = experts(hidden_states, topk_ids, topk_weights)      # [T, H], [T, k], [T, k] -> [T, H]

Tiers: a device pool of ``S`` slots (``w13`` [S, 2I, H], ``w2`` [S, H, I], the compute dtype) caches
experts; a fixed set of experts stays in host memory (stored dtype; pinned on CUDA); the others are read from
disk (the checkpoint, or the packed store) into a pinned staging slot when routed. ``S`` and the host set come
from the group's budgets.

A forward reads the routing once (one host sync), then:
1. starts a load for every routed expert that is not in a slot, into the coldest slots not needed by this
   step (hotness: an exponentially decayed count of the tokens routed to each expert), demand loads first on
   the group's loader thread;
2. tells the group the routing, which records it in the prefetcher and starts the next layer's predicted loads;
3. computes the routed experts already resident in one ``fused_moe`` call over the pool (``expert_slots``
   maps them to their slots, every other expert to -1), accumulating into an fp32 ``out``;
4. computes each other routed expert as it lands, one call each into the same ``out``; a slot freed by a
   computed expert takes the next pending load when the step routes more experts than there are slots.
Only routed experts (and the prefetcher's guesses) are ever read. ``stats`` counts loads and bytes per tier;
``last_forward`` holds the counters of the latest call.

On CUDA the loads are copies on the group's side stream, the compute stream waits on each load's event, and
a slot is overwritten only after an event recorded behind its last use. In CPU mode (``device="cpu"``, the
device pool is host memory) the loader thread does the copies while the caller computes, as the runtime does.
An interrupted forward waits for the loads it started and forgets the slots whose load did not finish.
"""
from __future__ import annotations

import numpy as np
import torch

from klotski.experts.group import DEMAND, PREFETCH, ExpertOffloadGroup
from klotski.experts.source import CheckpointExperts, StoreExperts, refuse_int4_checkpoint

HEAT_DECAY = 0.9
STAT_KEYS = ("forwards", "routed", "hits", "loads", "host_loads", "disk_loads", "host_bytes", "disk_bytes",
             "prefetch_loads", "prefetch_bytes", "prefetch_used")


class OffloadedExperts(torch.nn.Module):
    """Routed experts of one MoE layer from ``source`` (:class:`~klotski.experts.source.CheckpointExperts` or
    :class:`~klotski.experts.source.StoreExperts`), computed on ``device`` in ``dtype`` (default: the stored
    dtype) with ``activation`` ("silu" | "gelu")."""

    def __init__(self, source, *, group: ExpertOffloadGroup, device="cpu", dtype: torch.dtype | None = None,
                 activation: str = "silu", experts_fn=None, name: str | None = None):
        super().__init__()
        shape = source.shape
        self.source = source
        self.name = name or source.where
        self.num_experts, self.intermediate_size, self.hidden_size = (shape.num_experts, shape.intermediate_size,
                                                                      shape.hidden_size)
        self.device = torch.device(device)
        self.dtype = dtype or shape.dtype
        self.activation = activation
        self.group = group
        if experts_fn is None:
            from klotski.triton_kernels import fused_moe, fused_moe_torch

            experts_fn = fused_moe if self.device.type == "cuda" else fused_moe_torch
        self.experts_fn = experts_fn
        E, I, H = self.num_experts, self.intermediate_size, self.hidden_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        device_bytes = 3 * I * H * itemsize
        host_bytes = max(source.expert_nbytes(e) for e in range(E))
        self.layer, self.num_slots, host_count = group.register(self, device_bytes, host_bytes,
                                                                source.staging_bytes, E)
        # plain attributes, not buffers: engines moving or saving the model never touch the pool
        self.w13 = torch.empty(self.num_slots, 2 * I, H, dtype=self.dtype, device=self.device)
        self.w2 = torch.empty(self.num_slots, H, I, dtype=self.dtype, device=self.device)
        self.slot_expert = [-1] * self.num_slots
        self.slot_of: dict[int, int] = {}
        self.loading: dict[int, object] = {}  # expert -> Future of its load into slot_of[expert]
        self.prefetched: set[int] = set()
        self.last_use: list = [None] * self.num_slots  # CUDA events after each slot's latest read
        self.heat = np.zeros(E, dtype=np.float64)
        pin = self.device.type == "cuda"
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in group.expert_order(self.layer, E)[:host_count]:
            w13, w2 = source.read_host(e)
            self.host[e] = (w13.pin_memory(), w2.pin_memory()) if pin else (w13, w2)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.last_forward = dict(self.stats)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, layer: int, *, group: ExpertOffloadGroup | None = None,
                        gpu_memory=None, cpu_memory=None, offload_dir: str | None = None, **kwargs):
        """The experts of model layer ``layer`` of an HF checkpoint, read per expert from its safetensors
        files, or from the packed store in ``offload_dir`` (converted on first use). Without ``group`` a
        one-layer group is made from ``gpu_memory`` / ``cpu_memory``."""
        from klotski.checkpoint import SafetensorsIndex
        from klotski.model.spec import ModelSpec
        from klotski.model.weights import CheckpointWeights

        weights = CheckpointWeights(SafetensorsIndex(checkpoint_dir), ModelSpec.from_pretrained(checkpoint_dir))
        source = experts_source(weights, layer, offload_dir)
        if group is None:
            group = ExpertOffloadGroup(1, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
        return cls(source, group=group, **kwargs)

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def resident(self) -> list[int]:
        """Experts in a device slot and ready (no load in flight), by id."""
        return sorted(e for e in self.slot_of if e not in self.loading)

    def expert_nbytes(self, expert: int) -> int:
        """Bytes moved to bring ``expert`` to the device: its stored bytes (host copy or disk read)."""
        return self.source.expert_nbytes(expert)

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.num_experts} experts, {self.num_slots} device slots on {self.device}, "
                f"{len(self.host)} in host memory, {self.num_experts - len(self.host)} on disk")

    # ---- loads -------------------------------------------------------------------------------------------
    def _load_job(self, expert: int, slot: int, after):
        """The loader-thread job bringing ``expert`` into ``slot`` -> (tier, bytes, CUDA event or None)."""
        stream = self.group.copy_stream(self.device)
        host = self.host.get(expert)

        def job():
            ctx = torch.cuda.stream(stream) if stream is not None else _null()
            with ctx:
                if stream is not None and after is not None:
                    stream.wait_event(after)
                if host is not None:
                    self.w13[slot].copy_(host[0], non_blocking=stream is not None)
                    self.w2[slot].copy_(host[1], non_blocking=stream is not None)
                    return "host", self.expert_nbytes(expert), _record(stream)
                staging = self.group.staging_slot()
                try:
                    parts, w2 = self.source.read_staged(expert, self.group.reader, staging)
                    row = 0
                    for part in parts:
                        self.w13[slot, row:row + part.shape[0]].copy_(part, non_blocking=stream is not None)
                        row += part.shape[0]
                    self.w2[slot].copy_(w2, non_blocking=stream is not None)
                    event = _record(stream)
                except BaseException:
                    staging.release()
                    raise
                del parts, w2
                self.group.staged(staging, event)
                return "disk", self.expert_nbytes(expert), event
        return job

    def _start_load(self, expert: int, slot: int, priority: int) -> None:
        old = self.slot_expert[slot]
        if old >= 0:
            del self.slot_of[old]
            self.prefetched.discard(old)
        self.slot_expert[slot] = expert
        self.slot_of[expert] = slot
        self.loading[expert] = self.group.submit(self._load_job(expert, slot, self.last_use[slot]), priority)

    def _finish_load(self, expert: int, counts: dict) -> None:
        """Wait for ``expert``'s load; make the compute stream wait for its copy; count it."""
        tier, nbytes, event = self.loading[expert].result()  # a failed load stays in ``loading`` for _abort
        del self.loading[expert]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        prefetch = expert in self.prefetched  # stays marked until computed (counted as used then)
        counts["prefetch_loads" if prefetch else "loads"] += 1
        counts["prefetch_bytes" if prefetch else f"{tier}_bytes"] += nbytes
        if not prefetch:
            counts[f"{tier}_loads"] += 1

    def _drop_unused_prefetches(self, routed: set[int], counts: dict) -> None:
        """Prefetches of experts this step does not route: cancel those not started (their slots empty
        again), count the finished ones; a running one is waited for only if its slot is needed."""
        for e, fut in list(self.loading.items()):
            if e in routed:
                continue
            if fut.cancel():
                del self.loading[e]
                self.slot_expert[self.slot_of.pop(e)] = -1
                self.prefetched.discard(e)
            elif fut.done():
                self._finish_load(e, counts)

    def _victims(self, keep: set[int]) -> list[int]:
        """Slots that may be overwritten now (not holding an expert in ``keep``, no load in flight), coldest
        first (empty slots before any)."""
        free = [s for s, e in enumerate(self.slot_expert) if e < 0 or (e not in keep and e not in self.loading)]
        return sorted(free, key=lambda s: (self.slot_expert[s] >= 0, self.heat[self.slot_expert[s]]
                                           if self.slot_expert[s] >= 0 else 0.0))

    def prefetch(self, experts: list[int]) -> None:
        """Start loading predicted ``experts`` of this layer (most likely first) into its coldest slots, never
        evicting another predicted one (called by the group while the previous layer computes). The
        prediction is for the very tokens about to arrive, so it outranks the hotness of past steps."""
        wanted = [e for e in experts if e not in self.slot_of]
        victims = self._victims(set(experts))
        for e, slot in zip(wanted, victims):
            self._start_load(e, slot, PREFETCH)
            self.prefetched.add(e)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], topk_ids [T, k] (expert ids in [0, E)), topk_weights [T, k] -> [T, H] in
        hidden_states' dtype and device: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden_states[t])."""
        self._check(hidden_states, topk_ids, topk_weights)
        in_device, in_dtype = hidden_states.device, hidden_states.dtype
        x = hidden_states.to(self.device, self.dtype).contiguous()
        ids = topk_ids.to(self.device).contiguous()
        weights = topk_weights.to(self.device).contiguous()
        ids_cpu = topk_ids.detach().to("cpu", torch.int64)
        routed, tokens = torch.unique(ids_cpu, return_counts=True)
        routed, tokens = routed.tolist(), tokens.tolist()
        if routed and (routed[0] < 0 or routed[-1] >= self.num_experts):
            raise ValueError(f"{self.name}: topk_ids must be in [0, {self.num_experts}), got "
                             f"[{routed[0]}, {routed[-1]}]")
        self.heat *= HEAT_DECAY
        self.heat[routed] += tokens
        counts = dict.fromkeys(STAT_KEYS, 0)
        counts.update(forwards=1, routed=len(routed))
        try:
            out = self._compute(x, ids, weights, ids_cpu, routed, tokens, counts)
        except BaseException:
            self._abort()
            raise
        for k, v in counts.items():
            self.stats[k] += v
        self.last_forward = counts
        return out.to(in_device, in_dtype)

    def _compute(self, x, ids, weights, ids_cpu, routed, tokens, counts) -> torch.Tensor:
        self._drop_unused_prefetches(set(routed), counts)
        order = sorted(range(len(routed)), key=lambda i: -tokens[i])  # most tokens first
        ready = [e for e in routed if e in self.slot_of and e not in self.loading]
        queue = [e for e in routed if e in self.loading]  # prefetched, still in flight: they land first
        missing = [routed[i] for i in order if routed[i] not in self.slot_of]
        counts["hits"] = len(ready)
        pending = set(routed)  # routed experts not computed yet: their slots are kept

        def start_missing() -> None:  # into the slots free now (more routed experts than slots: computed ones)
            victims = self._victims(pending)
            while missing and not victims and not queue and self.loading:  # a mispredicted prefetch is running
                self._finish_load(next(iter(self.loading)), counts)
                victims = self._victims(pending)
            while missing and victims:
                e = missing.pop(0)
                self._start_load(e, victims.pop(0), DEMAND)
                queue.append(e)

        start_missing()
        self.group.observe(self.layer, ids_cpu)  # the next layer's prefetch queues behind this layer's loads
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32, device=self.device)
        if ready:
            self._run(x, ids, weights, out, ready, counts)
            pending.difference_update(ready)
            start_missing()
        while queue:
            e = queue.pop(0)
            self._finish_load(e, counts)
            self._run(x, ids, weights, out, [e], counts)
            pending.discard(e)
            start_missing()
        if missing:
            raise RuntimeError(f"{self.name}: {len(missing)} routed experts found no slot (internal error)")
        return out

    def _run(self, x, ids, weights, out, experts: list[int], counts: dict) -> None:
        slots = torch.full((self.num_experts,), -1, dtype=torch.int32)
        for e in experts:
            slots[e] = self.slot_of[e]
            if e in self.prefetched:
                counts["prefetch_used"] += 1
                self.prefetched.discard(e)
        self.experts_fn(x, self.w13, self.w2, weights, ids, expert_slots=slots.to(self.device), out=out,
                        activation=self.activation)
        if self.device.type == "cuda":
            for e in experts:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.last_use[self.slot_of[e]] = ev

    def _abort(self) -> None:
        """After a failed or interrupted forward: wait for this module's loads, forget unfinished slots."""
        for e, fut in list(self.loading.items()):
            try:
                fut.result()
            except BaseException:
                slot = self.slot_of.pop(e)
                self.slot_expert[slot] = -1
                self.prefetched.discard(e)
        self.loading.clear()

    def _check(self, hidden_states, topk_ids, topk_weights) -> None:
        H = self.hidden_size
        if hidden_states.dim() != 2 or hidden_states.shape[1] != H:
            raise ValueError(f"{self.name}: hidden_states must be [T, {H}], got {list(hidden_states.shape)}")
        T = hidden_states.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
            raise ValueError(f"{self.name}: topk_ids must be [{T}, k], got {list(topk_ids.shape)}")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"{self.name}: topk_weights {list(topk_weights.shape)} must match topk_ids "
                             f"{list(topk_ids.shape)}")
        if topk_ids.dtype.is_floating_point:
            raise ValueError(f"{self.name}: topk_ids must be integer, got {topk_ids.dtype}")


def experts_source(weights, layer: int, offload_dir: str | None = None):
    """The disk source of ``layer``'s experts: the packed store in ``offload_dir`` (converted from the
    checkpoint when missing) or, without ``offload_dir``, the checkpoint's own files."""
    if offload_dir is None:
        return CheckpointExperts(weights, layer)
    from klotski.store import open_store

    refuse_int4_checkpoint(weights)
    from klotski.store.directory import check_path

    spec = weights.spec
    return StoreExperts(open_store(weights.index, check_path(offload_dir)), layer, spec.moe_intermediate_size,
                        spec.hidden_size)


def _record(stream):
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
