"""The offloaded executor: ResidentModel's protocol (``new_cache`` / ``forward``) over placed weights.

One ``forward`` runs one step of a batch group (B rows = n micro-batches): the ops the plan's op builder
(:mod:`klotski.program`) emits, executed in order by :class:`~klotski.runtime.interpreter.StepInterpreter`.
The executor owns the pieces the ops use, one module each:

* :class:`~klotski.runtime.loads.WeightLoads` (``ex.loads``): a layer's streamed attention/gate/shared
  weights into a dense buffer, one routed expert into an expert pool slot, each on a loader lane;
* :class:`~klotski.runtime.kv_staging.KVStaging` (``ex.kv``): a micro-batch's KV layer from host memory into
  a device staging buffer and back;
* :class:`~klotski.runtime.compute.Compute` (``ex.compute``): attention, gate, grouped expert calls
  accumulating into one fp32 output, the shared expert / dense MLP.

Every load returns a :class:`~klotski.runtime.loader.Ticket`; compute waits on it right before use, and every
slot is released right after its last use. An interrupted forward (any exception, KeyboardInterrupt
included) cancels the pools, drains the lanes and resets, so the executor stays usable. The executor knows
nothing of planning: :class:`~klotski.runtime.session.OffloadedSession` plans, builds and replaces it.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from klotski.model.decoder import make_rotary
from klotski.model.kv_cache import query_valid
from klotski.model.moe import expert_activation
from klotski.prefetch import CorrelationPrefetcher, PrefetchStats
from klotski.prefill_chunks import chunk_sizes
from klotski.program import order_of
from klotski.program.host import HostCompute
from klotski.program.pools import kv_staging_buffers
from klotski.runtime.cache import GroupCache
from klotski.runtime.compute import Compute, StepState
from klotski.runtime.kv_staging import KVStaging
from klotski.runtime.loader import WAIT_TIMEOUT_S, Lanes
from klotski.runtime.loads import WeightLoads
from klotski.runtime.memory import BudgetError, TierMeter
from klotski.runtime.placement import Layout
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights
from klotski.units import format_bytes


class OffloadedExecutor:
    """Runs one plan: ``layout`` (placement + pool sizes) for ``policy`` with ``num_batches`` x ``batch_size``
    sequences per batch group. ``plan``: the planner's Plan it runs (read for the prefetch width); None when
    built by hand. ``timeout_s`` bounds every wait for a load or a pool slot."""

    def __init__(self, weights, layout: Layout, device: torch.device, dtype: torch.dtype, policy: str,
                 gpu: TierMeter, cpu: TierMeter, num_batches: int, batch_size: int,
                 prefetcher: CorrelationPrefetcher | None, experts_fn, costs, expert_order=None, store=None,
                 plan=None, timeout_s: float | None = WAIT_TIMEOUT_S, predictor=None):
        self.spec = weights.spec
        self.costs = costs  # bytes / FLOPs per op (traced with each span, for calibration)
        self.plan = plan
        # the plan's prefetch width (0: none, under expert selection); top_k without a klotski-order plan
        self.num_hot = plan.num_hot if plan is not None and plan.num_hot is not None else max(self.spec.top_k, 1)
        self.device, self.dtype, self.policy = device, dtype, policy
        self.cuda = device.type == "cuda"
        self.layout = layout
        self.gpu, self.cpu = gpu, cpu
        self.num_batches, self.batch_size = num_batches, batch_size
        self.group_size = num_batches * batch_size
        self.prefetcher = prefetcher
        # klotski.lookahead.ExpertPredictor (prefetch="lookahead"): table + gate lookahead, chosen per layer
        self.predictor = predictor
        self.closed = False
        self.lanes = None
        # host compute (klotski.program.host): the plan's attention per phase and cold-expert mode; the rule is
        # set by build_executor from the profile the plan was made on
        self.host = getattr(plan, "host", None) or HostCompute()
        self.expert_rule = None
        self.w = PlacedWeights(weights, layout, device, dtype, gpu, cpu, expert_order, store=store)
        try:  # anything started so far (the disk reader, lane threads) is stopped if the build is interrupted
            self.lanes = Lanes(device, timeout_s)
            self.tracer = Tracer(device)
            self.stats = PrefetchStats()
            act = expert_activation(self.spec) if self.spec.moe_layers else "silu"
            self.loads = WeightLoads(self.w, self.lanes, self.tracer, device, layout.dense_buffers, timeout_s)
            order = order_of(plan.policy, plan.num_hot) if plan is not None else policy
            self.kv = KVStaging(self.spec, self.w, self.lanes, self.tracer, gpu, device, timeout_s,
                                layout.placement.kv_buffers or kv_staging_buffers(order, num_batches))
            self.compute = Compute(self.spec, self.w, self.tracer, costs, make_rotary(self.spec, device), act,
                                   experts_fn, device)
            self._cache_bytes = (None, 0)
            self.time = {"prefill_s": 0.0, "decode_s": 0.0, "forwards": 0, "tokens_in": 0, "prefill_chunks": 0}
            from klotski.runtime.interpreter import StepInterpreter

            self.runner = StepInterpreter(self)
            if self.host.experts != "off" and not self.w.host_experts_plain():
                if self.host.experts == "all":
                    raise ValueError("cold experts on the CPU need plain host copies of the experts; this run's "
                                     "host experts are quantized (fp8 / int4): use host compute experts='off'")
                self.host = replace(self.host, experts="off")  # "auto": every cold expert is loaded
        except BaseException:
            self.close()
            raise

    @property
    def experts_fn(self):
        """The grouped expert kernel (``fused_moe``'s signature); settable (tests inject faults through it)."""
        return self.compute.experts_fn

    @experts_fn.setter
    def experts_fn(self, fn) -> None:
        self.compute.experts_fn = fn

    # ---- protocol --------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor) -> GroupCache:
        per_token = sum(self.spec.kv_cache_elems_per_token(i) for i in range(self.spec.num_layers))
        size = torch.empty((), dtype=self.dtype).element_size()
        need = batch_size * capacity * per_token * size
        old = self._cache_bytes
        if old[0] is not None:
            (self.gpu if old[0] == "gpu" else self.cpu).free("kv cache", old[1])
        reserve = self.activation_bytes(batch_size, 1, capacity)
        tier = "gpu" if self.layout.placement.kv == "gpu" and (
            self.gpu.budget is None or self.gpu.used + need + reserve <= self.gpu.budget) else "cpu"
        if tier == "cpu":
            self.cpu.hold("kv cache", need)
        else:
            self.gpu.hold("kv cache", need)
        self._cache_bytes = (tier, need)
        return GroupCache(self.spec.num_layers, pad, self.num_batches, capacity, tier, self.device)

    def activation_bytes(self, B: int, S: int, kv_len: int, all_logits: bool = False) -> int:
        """A forward's transient device memory: :meth:`klotski.costs.ModelCosts.activation_bytes`, the estimate
        the planner's schedule reserves too. It is an estimate, not a measurement: on CPU torch exposes no
        allocator statistics, so ``peak_gpu_bytes`` counts it as held for the whole forward (an upper bound of
        what the forward allocates: hidden states, the widest FFN intermediate, one batch's attention scores)."""
        return self.costs.activation_bytes(B, self.num_batches, S, kv_len, all_logits)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: GroupCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids [B, S] (left-padded) -> fp32 logits [B, S, V] or [B, V].

        When the group's activations for all S columns do not fit the device budget, the columns run in
        chunks (chunked prefill over the same KV cache: the same result, more weight traffic)."""
        if self.closed:
            raise RuntimeError("executor is closed")
        B, S = input_ids.shape
        room = (self.gpu.budget - self.gpu.used) if self.gpu.budget is not None else None
        # the first chunk size whose activations fit (the planner prices the same chunks: klotski.prefill_chunks)
        chunk = next((c for c in chunk_sizes(S) if room is None
                      or self.activation_bytes(B, c, cache.length + c, all_logits) <= room), 1)
        act = self.activation_bytes(B, chunk, cache.length + chunk, all_logits)
        if room is not None and act > room:
            raise BudgetError(
                f"gpu memory budget {format_bytes(self.gpu.budget)} is too small for this batch group "
                f"({B} sequences): activations of one token column need {format_bytes(act)} on top of "
                f"{format_bytes(self.gpu.used)} held; use fewer sequences per group or a larger gpu_memory "
                f"(at least {format_bytes(self.gpu.used + act)})"
            )
        outs = []
        if S > 1:
            self.time["prefill_chunks"] = max(self.time["prefill_chunks"], -(-S // chunk))
        for c in range(0, S, chunk):
            outs.append(self._timed_forward(input_ids[:, c : c + chunk], cache, all_logits, act, prefill=S > 1))
        return torch.cat(outs, dim=1) if all_logits else outs[-1]

    def _timed_forward(self, input_ids, cache, all_logits, act: int, prefill: bool) -> torch.Tensor:
        self.gpu.hold("activations", act, check=False)
        window = self.tracer.start_window()
        t0 = time.perf_counter()
        try:
            logits = self._forward(input_ids, cache, all_logits, prefill)
        except BaseException:
            self.abort()
            raise
        finally:
            self.gpu.free("activations", act)
        self.tracer.end_window(window)
        self.time["prefill_s" if prefill else "decode_s"] += time.perf_counter() - t0
        self.time["forwards"] += 1
        return logits

    def _forward(self, input_ids, cache: GroupCache, all_logits, prefill: bool = False):
        B, S = input_ids.shape
        ids = input_ids.to(self.device)
        st = StepState(cache, S, decode=False if prefill else None)  # a prefill's one-column chunk is no decode step
        st.all_logits = all_logits
        st.x = F.embedding(ids, self.w.embed)
        st.valid = query_valid(cache.length, cache.pad, S, self.device)
        for k, (s, e) in enumerate(cache.rows):
            mc = cache.micro[k]
            mc.pad, mc.length = cache.device_pads[k], cache.length
            st.masks.append(mc.key_mask(S, self.device))
            st.positions.append(mc.positions(S, self.device))
            if cache.tier == "cpu":
                mc.pad = mc.pad.cpu()
        if self.predictor is not None:
            self.predictor.reset_sequence()  # the table's too
        elif self.prefetcher is not None:
            self.prefetcher.reset_sequence()
        self.runner.run(st)  # the policy's ops, built from the plan and the routing the gates produce
        cache.length += S
        for mc in cache.micro:
            mc.length = cache.length
        return st.logits

    def record_routing(self, layer: int, topk_ids: torch.Tensor, predicted: list[int] | None) -> None:
        if self.predictor is not None:
            self.predictor.observe(layer, topk_ids)  # learns the table too, scores both sources
        elif self.prefetcher is not None:
            self.prefetcher.record(layer, topk_ids)
        if predicted:
            self.stats.update(predicted, topk_ids, self.spec.num_experts)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def abort(self) -> None:
        """After an interrupted forward: stop waiting loads, drop queued jobs, free every slot."""
        pools = self.loads.pools + [self.kv.pool]
        for p in pools:
            p.cancel()
        self.lanes.drain()
        if self.cuda:
            torch.cuda.synchronize()
        for p in pools:
            p.reset()

    def reset_metrics(self) -> None:
        self.w.counters.reset()
        self.tracer.reset()
        self.stats = PrefetchStats()
        self.compute.selection_stats.reset()
        self.time = {"prefill_s": 0.0, "decode_s": 0.0, "forwards": 0, "tokens_in": 0, "prefill_chunks": 0}
        self.gpu.reset_peak()
        self.cpu.reset_peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def metrics(self) -> dict:
        c = self.w.counters
        out = {
            "policy": self.policy,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
            "prefill_s": self.time["prefill_s"],
            "decode_s": self.time["decode_s"],
            "bubble_fraction": self.tracer.bubble_fraction,
            "bytes_disk_read": c.get("disk_read"),
            "bytes_h2d": c.get("h2d"),
            # disk records / tensors loaded by one native call each, and by the torch path (fp8, other dtypes)
            "disk_loads_native": c.get("native_loads"),
            "disk_loads_torch": c.get("torch_loads"),
            "bytes_kv_h2d": c.get("kv_h2d"),
            "bytes_kv_d2h": c.get("kv_d2h"),
            "peak_gpu_bytes": self.gpu.measured_peak(self.device),
            "peak_cpu_bytes": self.cpu.peak,
            "gpu_budget": self.gpu.budget,
            "cpu_budget": self.cpu.budget,
            "placement": self.layout.describe(self.spec.num_experts),
            "kv_tier": self._cache_bytes[0],
            "weights_per_tier": self.w.tier_bytes(),
            "prefill_chunks": self.time["prefill_chunks"],
        }
        out.update(self.stats.as_dict())
        out.update(self.compute.selection_metrics())  # expert selection: remapped assignments, distinct per layer
        if self.predictor is not None:
            out["prefetch_sources"] = {m: self.predictor.source(m) for m in self.spec.moe_layers}
            out["prefetch_lookahead_recall"] = self.predictor.hit_rate(source="lookahead")
            out["prefetch_table_recall"] = self.predictor.hit_rate(source="table")
        return out

    def write_trace(self, path: str) -> None:
        self.tracer.write_chrome(path)

    def write_timeline(self, path: str) -> None:
        self.tracer.write_timeline(path, f"{self.policy}: bubble fraction {self.tracer.bubble_fraction:.1%}")

    def close(self) -> None:
        """Stop the lane threads and the disk reader (idempotent)."""
        if not self.closed:
            self.closed = True
            if self.lanes is not None:
                self.lanes.close()
            if getattr(self, "w", None) is not None:
                self.w.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
