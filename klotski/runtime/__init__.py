"""The offloaded runtime: executes the layerwise / flexgen / klotski schedules for real (design §2, §4).

``build_offloaded(weights, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, ...)`` places the
weights under the budgets (device, host memory, disk through the packed expert store in ``offload_dir``) and
returns an :class:`~klotski.runtime.executor.OffloadedExecutor`: ResidentModel's protocol (``new_cache``,
``forward``) plus ``.metrics``, ``.reset_metrics()``, ``.write_trace()``, ``.write_timeline()``, ``.close()``.

On ``cuda`` copies run on dedicated streams with events; on ``cpu`` the "device" is a bounded RAM pool and
copies run on worker threads, so disk streaming and overlap are real in CI too.
"""
from __future__ import annotations

import os

import torch

from klotski.model.weights import CheckpointWeights
from klotski.prefetch import CorrelationPrefetcher
from klotski.runtime.executor import OffloadedExecutor
from klotski.runtime.memory import BudgetError, TierMeter
from klotski.runtime.placement import ModelBytes, streamed_bytes
from klotski.runtime.planning import (DEFAULT_WORKLOAD, REPLAN_FACTOR, InfeasibleError, layout_for_plan,
                                      machine_profile, make_plan, minimum_layout, model_costs)
from klotski.units import format_bytes, parse_bytes

OFFLOAD_POLICIES = ("layerwise", "flexgen", "klotski")
PREFETCH_TABLE = "klotski_prefetch.npz"

__all__ = ["OFFLOAD_POLICIES", "BudgetError", "OffloadedExecutor", "build_offloaded", "run_policy",
           "check_offload_dir", "prepare_run", "finish_run", "warm_up"]


def check_offload_dir(offload_dir: str | os.PathLike) -> str:
    """Create ``offload_dir`` if needed and check it is a writable directory (ValueError otherwise)."""
    path = os.path.abspath(os.fspath(offload_dir))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"offload_dir {path!r} cannot be created: {e.strerror}") from None
    if not os.path.isdir(path):
        raise ValueError(f"offload_dir {path!r} is not a directory")
    probe = os.path.join(path, ".klotski-write-test")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"offload_dir {path!r} is not writable: {e.strerror}") from None
    return path


def open_store(model_dir: str, offload_dir: str):
    """The packed expert store in ``offload_dir``, converted from ``model_dir`` when missing or unfinished."""
    from klotski.store import ExpertStore, StoreIncompleteError, convert_checkpoint

    try:
        return ExpertStore(offload_dir)
    except StoreIncompleteError:
        convert_checkpoint(model_dir, offload_dir)
        return ExpertStore(offload_dir)


def _count(value, name: str) -> int | None:
    """None for "auto" (the planner decides), else a positive int."""
    if value in (None, "auto"):
        return None
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1 or 'auto', got {value!r}")
    return int(value)


def _load_table(prefetcher: CorrelationPrefetcher, dirs) -> str | None:
    for d in dirs:
        path = os.path.join(d, PREFETCH_TABLE) if d else None
        if path and os.path.isfile(path):
            prefetcher.load(path)
            return path
    return None


def build_offloaded(weights: CheckpointWeights, device: torch.device, dtype: torch.dtype, policy: str,
                    gpu_memory, cpu_memory, offload_dir=None, num_batches="auto", batch_size="auto",
                    prefetcher: CorrelationPrefetcher | None = None, experts_fn=None,
                    workload: tuple[int, int] = DEFAULT_WORKLOAD, kv: str = "auto", hardware=None,
                    quantization: str | None = None) -> OffloadedExecutor:
    """Plan with :mod:`klotski.planner` and return an executor for ``policy`` that runs the plan.

    ``gpu_memory`` / ``cpu_memory``: ints (bytes) or strings with a unit ("24GiB"); None = unlimited.
    ``offload_dir``: where the disk tier lives (the packed expert store, converted on first use, and the
    prefetch table); None streams disk-tier weights from the checkpoint files. ``num_batches`` /
    ``batch_size``: "auto" = the planner's choice, an int fixes it (the planner still places the weights).
    ``workload``: (prompt tokens, generated tokens) per sequence to plan for. ``hardware``: a
    HardwareProfile (default: this machine's cached measured profile, :func:`~klotski.runtime.planning.machine_profile`).
    ``kv="cpu"`` forces the KV cache into host memory whatever the plan says. ``quantization="int4"``: the
    routed experts come from an int4 store in ``offload_dir`` on every tier (:mod:`klotski.runtime.int4`).
    """
    from klotski.runtime.int4 import check_quantization, int4_costs, open_int4_store
    from dataclasses import replace

    if policy not in OFFLOAD_POLICIES:
        raise ValueError(f"unknown offloading policy {policy!r}; available: {', '.join(OFFLOAD_POLICIES)}")
    if kv not in ("auto", "gpu", "cpu"):
        raise ValueError(f"kv must be 'auto', 'gpu' or 'cpu', got {kv!r}")
    device = torch.device(device)
    spec = weights.spec
    gpu_budget = None if gpu_memory is None else parse_bytes(gpu_memory)
    cpu_budget = None if cpu_memory is None else parse_bytes(cpu_memory)
    if device.type == "cuda" and gpu_budget is None:
        gpu_budget = torch.cuda.get_device_properties(device).total_memory - (1 << 30)
    n_fixed, b_fixed = _count(num_batches, "num_batches"), _count(batch_size, "batch_size")
    store_dir = check_offload_dir(offload_dir) if offload_dir is not None else None
    table = None
    if prefetcher is None and spec.moe_layers:
        prefetcher = CorrelationPrefetcher(spec.num_layers, spec.num_experts)
        table = _load_table(prefetcher, (store_dir, weights.index.model_dir))
    mb = ModelBytes.of(weights, dtype)
    costs = model_costs(spec, spec.weight_dtype or "bfloat16", dtype)
    int4_store = None
    if check_quantization(quantization) == "int4":
        int4_store = open_int4_store(weights, store_dir)
        mb, costs = int4_costs(int4_store, mb, costs)
    big = 1 << 62
    gpu_cap = gpu_budget if gpu_budget is not None else big
    cpu_cap = cpu_budget if cpu_budget is not None else big
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
            f"activations {format_bytes(act_min)})"
        )
    piece = max(mb.expert_ckpt, max(max(c.values()) for c in mb.per_layer_ckpt))
    ring = 2 * (-(-(piece + 16384) // 4096) * 4096)  # disk staging ring: 2 aligned slots
    hw = hardware if hardware is not None else machine_profile(device)
    prompt_len, gen_len = workload
    # the plan's schedule counts the staging ring itself (klotski.schedule.staging_bytes)
    cpu_plan = cpu_budget
    # A prompt whose activations do not fit runs in chunks (chunked prefill): plan for the longest chunk
    # that fits; the prediction then counts every chunk (klotski.runtime.planning.predict).
    q = prompt_len
    while True:
        try:
            plan = make_plan(costs, hw, policy, gpu_budget, cpu_plan, q, gen_len, n_fixed, b_fixed)
            break
        except InfeasibleError as e:
            if q == 1:
                raise BudgetError(str(e)) from None
            q = (q + 1) // 2
    if kv == "cpu":
        plan = replace(plan, placement=replace(plan.placement, kv="cpu"))
    n = n_fixed or plan.n
    # what the plan's schedule reserves too (the runtime's forward re-checks with the real lengths: a longer
    # prompt chunks, a KV cache that does not fit the device goes to host memory)
    planned = plan.batch_size * plan.n  # layerwise: the plan's one batch (explicit n splits a larger group)
    reserve = costs.activation_bytes(planned, plan.n, q, q + gen_len)
    if plan.placement.kv == "gpu":
        reserve += costs.kv_bytes(planned * (q + gen_len))
    host_cap = cpu_cap - ring - (costs.kv_bytes(planned * (q + gen_len)) if plan.placement.kv == "cpu" else 0)
    try:
        layout = layout_for_plan(mb, spec, plan, gpu_cap, reserve, host_cap)
    except BudgetError:  # the pools fit with less room for activations: the forward runs in smaller chunks
        layout = layout_for_plan(mb, spec, plan, gpu_cap, act_min, host_cap)
    expert_order = None
    if prefetcher is not None and prefetcher.popularity.sum() > 0:
        expert_order = [sorted(range(spec.num_experts), key=lambda e: (-prefetcher.popularity[layer][e], e))
                        for layer in range(spec.num_layers)]
    store = int4_store
    p = layout.placement
    if store is None and store_dir is not None and spec.moe_layers and p.experts_on("disk", spec.num_experts):
        store = open_store(weights.index.model_dir, store_dir)
        if store.int4 is not None:
            raise ValueError(f"expert store {store_dir} holds int4 experts: pass quantization='int4' to use it, "
                             f"or use another offload_dir")
        if store.fp8_block != spec.fp8_block:
            raise ValueError(f"expert store {store_dir} holds fp8_block {store.fp8_block} but the checkpoint "
                             f"{weights.index.model_dir} has {spec.fp8_block}: it was converted from another "
                             f"checkpoint; use another offload_dir or convert again")
    gpu, cpu = TierMeter("gpu", gpu_budget), TierMeter("cpu", cpu_budget)
    if experts_fn is None:
        from klotski.triton_kernels import fused_moe as experts_fn
    ex = OffloadedExecutor(weights, layout, device, dtype, policy, gpu, cpu, n, plan.batch_size, prefetcher,
                           experts_fn, expert_order, store=store, costs=costs, plan=plan)
    ex.offload_dir = store_dir
    ex.hardware = hw
    ex.workload = (prompt_len, gen_len)
    ex.table_path = table
    ex.build_args = dict(weights=weights, device=device, dtype=dtype, policy=policy, gpu_memory=gpu_memory,
                         cpu_memory=cpu_memory, offload_dir=offload_dir, num_batches=num_batches,
                         batch_size=batch_size, experts_fn=experts_fn, kv=kv, hardware=hardware,
                         quantization=quantization)
    return ex


def prepare_run(ex: OffloadedExecutor, prompt_token_ids: list[list[int]], max_tokens: list[int]) -> OffloadedExecutor:
    """Before a generate call: re-plan when the workload differs from the planned one by more than
    ``REPLAN_FACTOR`` (only when num_batches or batch_size is "auto"; the executor is rebuilt and the old one
    closed), warm the prefetcher up when it has no table yet, and set the plan's prediction for this run.
    Returns the executor to use."""
    prompt = max(1, round(sum(len(p) for p in prompt_token_ids) / max(1, len(prompt_token_ids))))
    gen = max(1, max(max_tokens, default=1))
    args = ex.build_args
    auto = args and "auto" in (args.get("num_batches"), args.get("batch_size"))
    p0, g0 = ex.workload
    far = lambda a, b: max(a, b) > REPLAN_FACTOR * min(a, b)  # noqa: E731
    if auto and (far(prompt, p0) or far(gen, g0)):
        table = None
        if ex.prefetcher is not None:
            table = ex.prefetcher
        ex.close()
        ex = build_offloaded(**args, prefetcher=table, workload=(prompt, gen))
    if ex.prefetcher is not None and ex.prefetcher.popularity.sum() == 0 and ex.policy == "klotski":
        ex.warmup_s = warm_up(ex, prompt_token_ids)
    ex.run_workload = {"prompt_len": prompt, "gen_len": gen, "sequences": len(prompt_token_ids)}
    return ex


def warm_up(ex: OffloadedExecutor, prompt_token_ids: list[list[int]], max_tokens: int = 32) -> float:
    """Design §2's warm-up run: one prefill of (up to) a batch group's prompts, truncated to ``max_tokens``,
    through the executor so the prefetcher records routing (popularity and the layer-to-layer table); it is
    updated online afterwards. Returns its seconds (reported as ``warmup_s``; not part of a run's time)."""
    import time

    from klotski.generation import left_pad

    t0 = time.perf_counter()
    chunk = [p[:max_tokens] for p in prompt_token_ids[: ex.group_size]]
    batch, pad = left_pad(chunk)
    cache = ex.new_cache(len(chunk), batch.shape[1], pad)
    ex.forward(batch, cache)
    return time.perf_counter() - t0


def finish_run(ex: OffloadedExecutor) -> str | None:
    """After a generate call: save the prefetch table in ``offload_dir`` (reloaded by the next
    ``build_offloaded``, which also reads one shipped in the model directory; the model directory itself is
    never written). Returns the path written, or None (no offload_dir)."""
    if ex.prefetcher is None or ex.prefetcher.popularity.sum() == 0 or not ex.offload_dir:
        return None
    return save_prefetch_table(ex, ex.offload_dir)


def save_prefetch_table(ex: OffloadedExecutor, directory: str) -> str:
    """Save the executor's learned routing table next to the model (or in offload_dir)."""
    path = os.path.join(directory, PREFETCH_TABLE)
    ex.prefetcher.save(path)
    return path


def run_policy(model_dir: str, policy: str, prompt_token_ids: list[list[int]], max_tokens: int = 16,
               device="auto", gpu_memory=None, cpu_memory=None, offload_dir=None, num_batches="auto",
               batch_size="auto", dtype="auto") -> dict:
    """Generate greedily under ``policy`` and return the run's metrics (for ``klotski demo`` / benchmarks)."""
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    llm = LLM(model_dir, device=device, dtype=dtype, policy=policy, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
              offload_dir=offload_dir, num_batches=num_batches, batch_size=batch_size)
    try:
        outs = llm.generate(prompt_token_ids=prompt_token_ids,
                            sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        m = llm.metrics
        result = {"policy": policy, "generated_tokens": m.generated_tokens, "total_s": m.total_s,
                  "tokens_per_s": m.tokens_per_s, **m.extra,
                  "token_ids": [o.token_ids for o in outs]}
        return result
    finally:
        llm.close() if hasattr(llm, "close") else None


def describe_budget(ex: OffloadedExecutor) -> str:
    return (f"gpu {format_bytes(ex.gpu.budget or 0)}, cpu {format_bytes(ex.cpu.budget or 0)}: "
            f"{ex.layout.describe(ex.spec.num_experts)}")
