"""From user options to a running executor, in two steps: plan (no allocation), then build.

* :class:`RunConfig` -- what the user asked for, parsed and checked once (budgets in bytes, fixed or "auto"
  group shape, the offload directory, the KV tier override, the hardware profile).
* :func:`plan_run` -- the planner's plan for one workload and the device pools around it
  (:class:`RunPlan`). Pure: it allocates nothing, so a plan that cannot be made (a :class:`BudgetError`)
  leaves whatever runs now untouched.
* :func:`build_executor` -- places the weights and starts the lanes for a :class:`RunPlan`. An interrupted
  build stops what it started.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from klotski.costs import ModelCosts
from klotski.hardware import HardwareProfile
from klotski.model.expert_selection import ExpertSelection
from klotski.planner import Plan
from klotski.runtime.executor import OffloadedExecutor
from klotski.runtime.loader import WAIT_TIMEOUT_S
from klotski.runtime.memory import BudgetError, TierMeter
from klotski.runtime.placement import Layout, ModelBytes, streamed_bytes
from klotski.runtime.planning import (InfeasibleError, host_experts_computable, layout_for_plan, machine_profile,
                                     make_plan, minimum_layout, model_costs, order_of)
from klotski.units import format_bytes, parse_bytes
from klotski.schedule import staging_bytes

OFFLOAD_POLICIES = ("layerwise", "flexgen", "klotski")
PREFETCH_SOURCES = ("table", "lookahead")


def check_offload_dir(offload_dir: str | os.PathLike) -> str:
    """Create ``offload_dir`` if needed and check it can serve as one (ValueError otherwise): a non-empty path
    to a directory that is empty or Klotski's own (a store, or what Klotski wrote there), writable unless it
    holds a finished store (reading one needs no write access)."""
    from klotski.store import MANIFEST_NAME, OffloadDir

    d = OffloadDir(offload_dir)
    if d.foreign_entries() or not os.path.isfile(os.path.join(d.path, MANIFEST_NAME)):
        d.ensure_ours()  # refuses another program's files; checks it is writable; marks it Klotski's
    return d.path


def _count(value, name: str) -> int | None:
    """None for "auto" (the planner decides), else a positive int."""
    if value in (None, "auto"):
        return None
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1 or 'auto', got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RunConfig:
    """An offloaded run's options, checked. Budgets in bytes (None: unlimited); ``num_batches`` /
    ``batch_size`` None = the planner's choice; ``kv`` "auto" | "gpu" | "cpu" (forces the KV tier);
    ``hardware`` None = this machine's cached profile."""

    weights: object  # klotski.model.weights.CheckpointWeights
    device: torch.device
    dtype: torch.dtype
    policy: str
    gpu_budget: int | None
    cpu_budget: int | None
    offload_dir: str | None
    num_batches: int | None
    batch_size: int | None
    experts_fn: object = None
    kv: str = "auto"
    hardware: HardwareProfile | None = None
    timeout_s: float | None = WAIT_TIMEOUT_S
    rebuild_store: bool = False  # replace another checkpoint's store in offload_dir (refused otherwise)
    quantization: str | None = None  # "int4": routed experts from an int4 store (klotski.runtime.int4)
    prefetch: str = "table"  # klotski's hot-expert prediction: "table" (correlation) | "lookahead" (+ gate lookahead)
    expert_selection: ExpertSelection = ExpertSelection()  # decode-step expert selection (off: exact routing)
    host_compute: object = "auto"  # "auto" (planner searches on CUDA; off in CPU mode) | "off" | a HostCompute

    @classmethod
    def of(cls, weights, device, dtype, policy: str, gpu_memory=None, cpu_memory=None, offload_dir=None,
           num_batches="auto", batch_size="auto", experts_fn=None, kv: str = "auto", hardware=None,
           timeout_s: float | None = WAIT_TIMEOUT_S, rebuild_store: bool = False,
           quantization: str | None = None, prefetch: str = "table", expert_selection=None,
           host_compute="auto") -> "RunConfig":
        """``gpu_memory`` / ``cpu_memory``: ints (bytes) or strings with a unit ("24GiB"); None = unlimited
        (on CUDA the device's memory less 1 GiB)."""
        if policy not in OFFLOAD_POLICIES:
            raise ValueError(f"unknown offloading policy {policy!r}; available: {', '.join(OFFLOAD_POLICIES)}")
        if kv not in ("auto", "gpu", "cpu"):
            raise ValueError(f"kv must be 'auto', 'gpu' or 'cpu', got {kv!r}")
        device = torch.device(device)
        gpu = None if gpu_memory is None else parse_bytes(gpu_memory)
        cpu = None if cpu_memory is None else parse_bytes(cpu_memory)
        if device.type == "cuda" and gpu is None:
            gpu = torch.cuda.get_device_properties(device).total_memory - (1 << 30)
        from klotski.runtime.int4 import check_quantization

        quantization = check_quantization(quantization, weights.spec)
        if prefetch not in PREFETCH_SOURCES:
            raise ValueError(f"prefetch must be one of {PREFETCH_SOURCES}, got {prefetch!r}")
        selection = ExpertSelection.parse(expert_selection)
        from klotski.program.host import parse_host_compute

        host_compute = parse_host_compute(host_compute)
        store_dir = check_offload_dir(offload_dir) if offload_dir is not None else None
        return cls(weights, device, dtype, policy, gpu, cpu, store_dir, _count(num_batches, "num_batches"),
                   _count(batch_size, "batch_size"), experts_fn, kv, hardware, timeout_s, bool(rebuild_store),
                   quantization, prefetch, selection, host_compute)

    @property
    def planner_host(self):
        """What the planner does with host compute: search it on a GPU ("auto"), never in CPU mode (the device
        is the CPU already), or the fixed choice given."""
        if self.host_compute == "auto":
            return "search" if self.device.type == "cuda" else "off"
        return self.host_compute

    @property
    def auto(self) -> bool:
        """Whether the planner chooses the group shape (then a very different workload re-plans)."""
        return self.num_batches is None or self.batch_size is None


@dataclass(frozen=True)
class RunPlan:
    """What one executor runs: the plan, the pools around it, the workload it was made for, the profile."""

    plan: Plan
    layout: Layout
    num_batches: int
    workload: tuple[int, int]  # (prompt tokens, generated tokens) per sequence
    hardware: HardwareProfile
    costs: ModelCosts


def plan_run(cfg: RunConfig, workload: tuple[int, int], hardware: HardwareProfile | None = None) -> RunPlan:
    """Plan ``cfg`` for ``workload``; raises BudgetError when no plan fits (nothing is allocated)."""
    weights, spec, policy = cfg.weights, cfg.weights.spec, cfg.policy
    mb = ModelBytes.of(weights, cfg.dtype)
    costs = model_costs(spec, spec.weight_dtype or "bfloat16", cfg.dtype)
    if cfg.quantization == "int4":  # experts priced as stored (int4 codes + scales), on the device too
        from klotski.runtime.int4 import int4_costs, open_int4_store

        with open_int4_store(weights, cfg.offload_dir, cfg.rebuild_store) as store:  # converted on first use
            mb, costs = int4_costs(store, mb, costs)
    big = 1 << 62
    gpu_cap = cfg.gpu_budget if cfg.gpu_budget is not None else big
    cpu_cap = cfg.cpu_budget if cfg.cpu_budget is not None else big
    # the runtime's own floor: one layer streamed from disk, the fewest expert slots, one token's activations
    minimum = minimum_layout(mb, spec, policy)
    act_min = costs.activation_bytes(1, 1, 1, 2)
    if minimum.device_bytes + act_min > gpu_cap:
        lo = minimum.expert_slots
        one_layer = streamed_bytes(mb, minimum.placement) + lo * mb.expert
        raise BudgetError(
            f"gpu_memory {format_bytes(gpu_cap)} is too small for one layer's working set under policy "
            f"{policy!r}: needs at least {format_bytes(minimum.device_bytes + act_min)} "
            f"(embeddings/LM head/norms {format_bytes(mb.globals + sum(d['norm'] for d in mb.per_layer))}, "
            f"one layer's attention+gate+shared and {lo} expert slot(s) {format_bytes(one_layer)}, "
            f"activations {format_bytes(act_min)})", min_gpu_memory=minimum.device_bytes + act_min
        )
    hw = hardware or cfg.hardware or machine_profile(cfg.device)
    prompt_len, gen_len = workload
    # A prompt whose activations do not fit runs in chunks (chunked prefill): plan for the longest chunk
    # that fits; the prediction then counts every chunk (klotski.runtime.planning.predict).
    q = prompt_len
    while True:
        try:
            plan = make_plan(costs, hw, policy, cfg.gpu_budget, cfg.cpu_budget, q, gen_len, cfg.num_batches,
                             cfg.batch_size, kv=None if cfg.kv == "auto" else cfg.kv,
                             expert_selection=cfg.expert_selection, host=cfg.planner_host,
                             host_experts=host_experts_computable(spec, cfg.quantization))
            break
        except InfeasibleError as e:
            if q == 1:
                raise BudgetError(str(e), e.min_gpu_memory, e.min_cpu_memory) from None
            q = (q + 1) // 2
    n = cfg.num_batches or plan.n
    # what the plan's schedule reserves too (the runtime's forward re-checks with the real lengths: a longer
    # prompt chunks, a KV cache that does not fit the device goes to host memory)
    planned = plan.batch_size * plan.n  # layerwise: the plan's one batch (explicit n splits a larger group)
    reserve = costs.activation_bytes(planned, plan.n, q, q + gen_len)
    if plan.placement.kv == "gpu":
        reserve += costs.kv_bytes(planned * (q + gen_len))
    ring = staging_bytes(costs, plan.placement)  # the disk staging ring, as the planner counts it
    host_cap = cpu_cap - ring - (costs.kv_bytes(planned * (q + gen_len)) if plan.placement.kv == "cpu" else 0)
    try:
        layout = layout_for_plan(mb, spec, plan, gpu_cap, reserve, host_cap)
    except BudgetError:  # the pools fit with less room for activations: the forward runs in smaller chunks
        layout = layout_for_plan(mb, spec, plan, gpu_cap, act_min, host_cap)
    # what runs: the plan's placement with the pools that fit (the prediction is made for these)
    plan = replace(plan, dense_buffers=layout.dense_buffers, expert_slots=layout.expert_slots)
    return RunPlan(plan, layout, n, (prompt_len, gen_len), hw, costs)


def build_executor(cfg: RunConfig, rp: RunPlan, prefetcher=None) -> OffloadedExecutor:
    """Place the weights and start the lanes for ``rp``. ``prefetcher``: the correlation table shared across
    re-plans (read here for the popularity order of resident experts, not changed)."""
    weights, spec = cfg.weights, cfg.weights.spec
    expert_order = None
    if prefetcher is not None and prefetcher.popularity.sum() > 0:
        expert_order = [sorted(range(spec.num_experts), key=lambda e: (-prefetcher.popularity[layer][e], e))
                        for layer in range(spec.num_layers)]
    store = None
    p = rp.layout.placement
    if cfg.quantization == "int4":  # every tier's experts come from the int4 store
        from klotski.runtime.int4 import open_int4_store

        store = open_int4_store(weights, cfg.offload_dir)
    elif cfg.offload_dir is not None and spec.moe_layers and p.experts_on("disk", spec.num_experts):
        from klotski.store import open_store

        store = open_store(weights.index, cfg.offload_dir, rebuild=cfg.rebuild_store)
    gpu, cpu = TierMeter("gpu", cfg.gpu_budget), TierMeter("cpu", cfg.cpu_budget)
    experts_fn = cfg.experts_fn
    if experts_fn is None:
        from klotski.triton_kernels import fused_moe as experts_fn
    ex = OffloadedExecutor(weights, rp.layout, cfg.device, cfg.dtype, cfg.policy, gpu, cpu, rp.num_batches,
                           rp.plan.batch_size, prefetcher, experts_fn, rp.costs, expert_order, store=store,
                           plan=rp.plan, timeout_s=cfg.timeout_s, predictor=_predictor(cfg, rp, prefetcher, gpu))
    ex.compute.selection = cfg.expert_selection  # applied by Compute.gate on decode steps
    if ex.host.experts == "auto":  # the cold-expert rule on the profile the plan was made on
        from klotski.program.host import ExpertRule

        ex.expert_rule = ExpertRule(rp.costs, rp.hardware)
    ex.compute.loads_whole_layer = order_of(rp.plan) in ("flexgen", "layerwise")  # offload-aware: nothing to save
    return ex


def _predictor(cfg: RunConfig, rp: RunPlan, prefetcher, gpu: TierMeter):
    """With ``prefetch="lookahead"`` and the klotski order: an ExpertPredictor over the shared table and every MoE
    layer's norm + router, kept on the device (counted in the device budget)."""
    if cfg.prefetch != "lookahead" or prefetcher is None or order_of(rp.plan) != "klotski":
        return None
    from klotski.lookahead import ExpertPredictor, GateLookahead

    lookahead = GateLookahead.from_weights(cfg.weights, cfg.device, cfg.dtype)
    gpu.hold("lookahead gates", sum(t.numel() * t.element_size() for w in lookahead.gates.values()
                                    for t in w.values()))
    return ExpertPredictor(cfg.weights.spec, prefetcher, lookahead)
