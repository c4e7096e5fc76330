"""The runtime's bridge to :mod:`klotski.planner`: the machine's profile, the plan, the device pools it implies.

* :func:`machine_profile` -- this machine's :class:`~klotski.hardware.HardwareProfile` from the one cache of
  :mod:`klotski.profile_cache` (``$XDG_CACHE_HOME/klotski/hardware-<device>.json``), measured when missing and
  refined by every offloaded run (:func:`calibrate_from_run`).
* :func:`make_plan` -- the planner's plan for (policy, budgets, model, workload). ``num_batches`` /
  ``batch_size`` given explicitly are fixed and the planner picks the rest (placement, KV tier, prefetch
  width) for them. The placement is the planner's and the runtime never changes it; the plan's pools are
  the runtime's, shrunk only when activations need the room (:func:`layout_for_plan`).
* :func:`calibrate_from_run` -- fit the profile's rates to the per-op timings of a measured run (the
  executor's trace) with :func:`klotski.calibration.calibrate`, and cache the result as the profile.

Workload: the engine plans at construction for a default workload (:data:`DEFAULT_WORKLOAD`) and re-plans
(rebuilding the executor) when a ``generate`` call's mean prompt length or generation length differs from the
planned one by more than :data:`REPLAN_FACTOR`; otherwise it only re-scores the plan's prediction for the
actual lengths.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from klotski.calibration import calibrate
from klotski.costs import ModelCosts
from klotski.hardware import HardwareProfile
from klotski.profile_cache import ProfileCache
from klotski.program import order_of as program_order
from klotski.planner import BATCH_SIZES, GROUP_SIZES, InfeasibleError, Plan, Planner
from klotski.routing_stats import RoutingStats
from klotski.runtime.memory import BudgetError
from klotski.program.pools import slot_targets
from klotski.runtime.placement import Layout, ModelBytes, layout_memory
from klotski.schedule import Placement, StepShape
from klotski.simulate import simulate_model_step
from klotski.units import format_bytes

DEFAULT_WORKLOAD = (128, 16)  # (prompt tokens, generated tokens) planned for before the first generate
REPLAN_FACTOR = 2.0
UNLIMITED = 1 << 50


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def profile_path(device: str) -> Path:
    """Where this machine's profile of ``device`` ("cuda" | "cpu") is cached (:mod:`klotski.profile_cache`)."""
    return ProfileCache().path(device)


def machine_profile(device: torch.device | str) -> HardwareProfile:
    """This machine's profile for ``device``: cached, else measured (and cached only when trusted); see
    :mod:`klotski.profile_cache` for the precedence."""
    return ProfileCache().get(torch.device(device).type)


def model_costs(spec, checkpoint_dtype: str, dtype: torch.dtype) -> ModelCosts:
    """Stored bytes in the checkpoint's dtype, device copies and activations in the compute dtype."""
    name = _dtype_name(dtype)
    costs = ModelCosts.from_spec(spec, weight_dtype=checkpoint_dtype, act_dtype=name)
    return replace(costs, device_dtype=name)


def host_experts_computable(spec, quantization: str | None) -> bool:
    """Whether a run's cold experts can be computed on the CPU: only from plain host copies, so not when the
    experts are int4 (a store's codes + scales) or fp8 (weights + block scales). Known before the weights are
    placed, for the planner; the executor checks the placed copies again
    (:meth:`~klotski.runtime.weights.PlacedWeights.host_experts_plain`)."""
    return quantization != "int4" and spec.fp8_block is None


def make_plan(costs: ModelCosts, hw: HardwareProfile, policy: str, gpu_budget: int | None, cpu_budget: int | None,
              prompt_len: int, gen_len: int, num_batches: int | None = None, batch_size: int | None = None,
              kv: str | None = None, expert_selection=None, host="off", host_experts: bool = True) -> Plan:
    """The planner's plan; ``num_batches`` / ``batch_size`` (None = the planner's choice) fix the group shape,
    ``kv`` ("gpu" | "cpu"; None = the planner's choice) the KV cache's tier. ``expert_selection`` (an enabled
    :class:`~klotski.model.expert_selection.ExpertSelection`): decode steps are planned with the fewer distinct
    experts it leaves (:meth:`RoutingStats.with_selection`). ``host``: "off" | "search" | a fixed
    :class:`~klotski.program.host.HostCompute` (attention per phase and cold experts on the CPU);
    ``host_experts``: whether this run can compute cold experts on the CPU (:func:`host_experts_computable`)."""
    hw = replace(hw, gpu_memory=gpu_budget if gpu_budget is not None else UNLIMITED,
                 cpu_memory=cpu_budget if cpu_budget is not None else UNLIMITED)
    decode_routing = None
    spec = costs.spec
    if expert_selection is not None and expert_selection.enabled and spec.num_experts:
        decode_routing = RoutingStats.uniform(spec.num_experts, max(spec.top_k, 1)).with_selection(
            expert_selection.aggressiveness, expert_selection.offload_aware)
    planner = Planner(costs, hw, prompt_len, gen_len, decode_routing=decode_routing, host=host,
                      host_experts=host_experts)
    if kv is not None:
        planner.kv_tiers = (kv,)
    if num_batches is None and batch_size is None:
        return planner.plan(policy)
    ns = [num_batches] if num_batches is not None else ([1] if policy == "layerwise" else list(GROUP_SIZES))
    bs = [batch_size] if batch_size is not None else list(BATCH_SIZES)
    if policy == "layerwise":
        ns = [1]  # layerwise runs micro-batches one after another; n only splits the group
    best = None
    for n in ns:
        for b in bs:
            for kv in planner.kv_tiers:
                for hot, overlap in planner.variants(policy):
                    p = planner.evaluate(policy, b, n, kv, hot, overlap)
                    if p is not None and p.beats(best):
                        best = p
    if best is None:
        raise planner.infeasible(policy)
    return best


def predict(plan: Plan, costs: ModelCosts, hw: HardwareProfile, prompt_len: int, gen_len: int,
            sequences: int | None = None, prefill_chunks: int = 1) -> float:
    """Tokens/s the plan's schedule predicts for the given workload (``sequences`` <= the group: a partial
    group runs with smaller batches; ``prefill_chunks`` > 1: the prompt ran in that many chunks)."""
    b, n = plan.batch_size, plan.n
    seqs = sequences if sequences is not None else b * n
    if plan.placement.kv not in ("gpu", "cpu"):
        raise ValueError(f"plan placement kv must be gpu or cpu, got {plan.placement.kv!r}")
    if policy_uses_group(plan.policy):
        b = max(1, -(-seqs // n))
    else:
        b, n = max(1, min(b, seqs)), 1
    ctx = prompt_len + gen_len
    total = 0.0
    chunk = -(-prompt_len // max(1, prefill_chunks))
    past = 0
    while past < prompt_len:
        q = min(chunk, prompt_len - past)
        shape = StepShape("prefill", b, n, q, past, ctx)
        total += _step(plan, costs, hw, shape)
        past += q
    if gen_len > 1:
        shape = StepShape("decode", b, n, 1, prompt_len + gen_len // 2, ctx)
        total += (gen_len - 1) * _step(plan, costs, hw, shape)
    if not policy_uses_group(plan.policy):
        total *= -(-seqs // b)  # layerwise: each micro-batch runs the whole model on its own
    return seqs * gen_len / total if total > 0 else 0.0


def policy_uses_group(policy: str) -> bool:
    return policy in ("flexgen", "klotski")


def order_of(plan: Plan) -> str:
    """The op order ``plan`` runs in (:func:`klotski.program.order_of`)."""
    return program_order(plan.policy, plan.num_hot)


def _step(plan: Plan, costs, hw, shape: StepShape) -> float:
    return simulate_model_step(order_of(plan), costs, plan.placement, shape, hw, num_hot=plan.num_hot,
                               overlap=plan.overlap, dense_buffers=plan.dense_buffers,
                               expert_slots=plan.expert_slots, host=plan.host).makespan


def layout_for_plan(mb: ModelBytes, spec, plan: Plan, gpu_cap: int, reserve_gpu: int, host_cap: int | None = None) -> Layout:
    """The runtime's layout of ``plan``: exactly its placement, and its pools (``plan.dense_buffers``,
    ``plan.expert_slots``). Nothing is re-placed. When the pools do not fit next to the placed weights and
    ``reserve_gpu`` bytes of activations, the streaming expert slots shrink toward the order's minimum and
    then the dense buffers to one (fewer loads in flight, the same weights where the planner put them);
    the caller re-predicts for the pools that result. A plan whose host-tier weights exceed ``host_cap``, or
    whose smallest pools do not fit, is refused with a BudgetError naming what it needs."""
    p = plan.placement
    E = mb.num_experts
    policy = order_of(plan)
    host = layout_memory(mb, p, 1, 0).host_bytes
    if host_cap is not None and host > host_cap:
        raise BudgetError(
            f"cpu_memory cannot hold the {policy} plan's host-resident weights ({p.describe(E)}): they need "
            f"{format_bytes(host)}, {format_bytes(host_cap)} is left after the KV cache and the disk staging ring")
    lo, _, _ = slot_targets(policy, spec, p.experts_on("gpu", E) if E else 0, plan.num_hot, plan.overlap)
    hi = max(plan.expert_slots, lo)
    for buffers in sorted({plan.dense_buffers, 1}, reverse=True):
        for slots in range(hi, lo - 1, -1):
            lay = layout_memory(mb, p, buffers, slots)
            if lay.device_bytes + reserve_gpu <= gpu_cap:
                return lay
    lay = layout_memory(mb, p, 1, lo)
    raise BudgetError(
        f"gpu_memory {format_bytes(gpu_cap)} cannot hold the {policy} plan ({p.describe(E)}) with its smallest "
        f"pools ({lo} expert slot(s), one dense buffer): needs {format_bytes(lay.device_bytes + reserve_gpu)} "
        f"including activations {format_bytes(reserve_gpu)}")


def minimum_layout(mb: ModelBytes, spec, policy: str) -> Layout:
    """Everything streamed from disk, one dense buffer, the fewest expert slots: one layer's working set."""
    off = Placement(attn="disk", gate="disk", shared="disk", experts_gpu=0, experts_cpu=0, kv="gpu")
    lo, _, _ = slot_targets(policy, spec, 0, None, False)
    return layout_memory(mb, off, 1, lo)


def calibrate_from_run(ex, hw: HardwareProfile, save: bool = True) -> HardwareProfile:
    """Fit ``hw`` (the profile the run was planned with) to the executor's last run: every traced op
    (compute spans with their FLOPs, copies with their bytes and link) is paired with its measured seconds
    and :func:`klotski.calibration.calibrate` refits the rates. Cached as this machine's profile when
    ``save`` (never for a run timed under the Triton interpreter)."""
    obs = ex.tracer.observations()
    if not obs:
        raise ValueError("calibrate_from_run: the executor has no traced ops (run generate first)")
    cal = ProfileCache().feed_back(hw, obs, _dtype_name(ex.dtype)) if save else None
    if cal is None:
        cal = calibrate(hw, obs, dtype=_dtype_name(ex.dtype))
        cal = replace(cal, source=hw.source.split("+calibrated")[0] + "+calibrated",
                      notes=(hw.notes + f"; calibrated on {len(obs)} ops of a {ex.policy} run").lstrip("; "))
    return cal


__all__ = ["DEFAULT_WORKLOAD", "REPLAN_FACTOR", "InfeasibleError", "calibrate_from_run", "host_experts_computable",
           "layout_for_plan",
           "machine_profile", "make_plan", "minimum_layout", "model_costs", "predict", "prediction_metrics",
           "profile_path"]


def prediction_metrics(plan: Plan, costs: ModelCosts, hw: HardwareProfile, planned_workload: tuple[int, int],
                       run_workload: dict | None, group_size: int, prefill_chunks: int, num_experts: int) -> dict:
    """The plan's figures for ``LLM.metrics.extra``: ``predicted_tokens_per_s`` for the workload the last
    ``generate`` ran (``run_workload``: its prompt / generation lengths and sequences, split into batch groups
    of ``group_size``; the prefill chunks the executor actually used), the plan as made, and the profile it
    is predicted on. Without a run, the plan's own prediction."""
    out = {"planned_tokens_per_s": plan.tokens_per_s, "planned_workload": list(planned_workload),
           "plan": {"batch_size": plan.batch_size, "n": plan.n, "num_hot": plan.num_hot, "overlap": plan.overlap,
                    "placement": plan.placement.describe(num_experts), "host": plan.host.describe()},
           "hardware_profile": f"{hw.name} [{hw.source}]"}
    if not run_workload:
        out["predicted_tokens_per_s"] = plan.tokens_per_s
        return out
    total_s, tokens = 0.0, 0
    left = run_workload["sequences"]
    chunks = max(1, prefill_chunks)
    while left > 0:
        seqs = min(left, group_size)
        rate = predict(plan, costs, hw, run_workload["prompt_len"], run_workload["gen_len"], seqs, chunks)
        total_s += seqs * run_workload["gen_len"] / rate if rate > 0 else 0.0
        tokens += seqs * run_workload["gen_len"]
        left -= seqs
    out["predicted_tokens_per_s"] = tokens / total_s if total_s > 0 else 0.0
    return out
