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
from klotski.runtime.executor import OffloadedExecutor, activation_bytes
from klotski.runtime.memory import BudgetError, TierMeter
from klotski.runtime.placement import ModelBytes, auto_placement
from klotski.units import format_bytes, parse_bytes

OFFLOAD_POLICIES = ("layerwise", "flexgen", "klotski")
PREFETCH_TABLE = "klotski_prefetch.npz"
DEFAULT_BATCHES = {"layerwise": 1, "flexgen": 4, "klotski": 4}
DEFAULT_BATCH_SIZE = 4

__all__ = ["OFFLOAD_POLICIES", "BudgetError", "OffloadedExecutor", "build_offloaded", "run_policy",
           "check_offload_dir"]


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


def _count(value, default: int, name: str) -> int:
    if value in (None, "auto"):
        return default
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1 or 'auto', got {value!r}")
    return int(value)


def build_offloaded(weights: CheckpointWeights, device: torch.device, dtype: torch.dtype, policy: str,
                    gpu_memory, cpu_memory, offload_dir=None, num_batches="auto", batch_size="auto",
                    prefetcher: CorrelationPrefetcher | None = None, experts_fn=None, prompt_hint: int = 16,
                    context_hint: int = 64, kv: str = "auto"                    ) -> OffloadedExecutor:
    """Place ``weights`` under the budgets and return an executor for ``policy``.

    ``gpu_memory`` / ``cpu_memory``: ints (bytes) or strings with a unit ("24GiB"); None = unlimited.
    ``offload_dir``: where the disk tier lives (the packed expert store, converted on first use, and the
    prefetch table); None streams disk-tier weights from the checkpoint files. ``context_hint``: tokens per
    sequence to reserve KV space for when placing weights in host memory; ``prompt_hint``: prompt tokens
    per sequence to reserve device activations for.
    """
    if policy not in OFFLOAD_POLICIES:
        raise ValueError(f"unknown offloading policy {policy!r}; available: {', '.join(OFFLOAD_POLICIES)}")
    device = torch.device(device)
    spec = weights.spec
    gpu_budget = None if gpu_memory is None else parse_bytes(gpu_memory)
    cpu_budget = None if cpu_memory is None else parse_bytes(cpu_memory)
    if device.type == "cuda" and gpu_budget is None:
        gpu_budget = torch.cuda.get_device_properties(device).total_memory - (1 << 30)
    n = _count(num_batches, DEFAULT_BATCHES[policy], "num_batches")
    bs = _count(batch_size, DEFAULT_BATCH_SIZE, "batch_size")
    if policy == "layerwise" and num_batches in (None, "auto"):
        n = 1
    store_dir = check_offload_dir(offload_dir) if offload_dir is not None else None
    if prefetcher is None and spec.moe_layers:
        prefetcher = CorrelationPrefetcher(spec.num_layers, spec.num_experts)
        for d in (store_dir, weights.index.model_dir):
            path = os.path.join(d, PREFETCH_TABLE) if d else None
            if path and os.path.isfile(path):
                prefetcher.load(path)
                break
    mb = ModelBytes.of(weights, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    group = n * bs
    act = activation_bytes(spec, dtype, n, group, prompt_hint, context_hint)
    kv_bytes = group * context_hint * sum(spec.kv_cache_elems_per_token(i) for i in range(spec.num_layers)) * size
    big = 1 << 62
    gpu_cap = gpu_budget if gpu_budget is not None else big
    cpu_cap = cpu_budget if cpu_budget is not None else big
    ring = 2 * (max(mb.expert_ckpt, max(max(c.values()) for c in mb.per_layer_ckpt)) + 8192)  # disk staging
    reserve_cpu = min(kv_bytes, max(0, cpu_cap - ring) // 2) + ring
    layout = auto_placement(mb, spec, policy, gpu_cap, cpu_cap, act, reserve_cpu)
    if kv not in ("auto", "gpu", "cpu"):
        raise ValueError(f"kv must be 'auto', 'gpu' or 'cpu', got {kv!r}")
    if kv == "cpu":
        from dataclasses import replace

        layout = replace(layout, placement=replace(layout.placement, kv="cpu"))
    expert_order = None
    if prefetcher is not None and prefetcher.popularity.sum() > 0:
        expert_order = [sorted(range(spec.num_experts), key=lambda e: (-prefetcher.popularity[layer][e], e))
                        for layer in range(spec.num_layers)]
    store = None
    p = layout.placement
    if store_dir is not None and spec.moe_layers and p.experts_on("disk", spec.num_experts):
        store = open_store(weights.index.model_dir, store_dir)
    gpu, cpu = TierMeter("gpu", gpu_budget), TierMeter("cpu", cpu_budget)
    if experts_fn is None:
        from klotski.triton_kernels import fused_moe as experts_fn
    ex = OffloadedExecutor(weights, layout, device, dtype, policy, gpu, cpu, n, bs, prefetcher, experts_fn,
                           expert_order, store=store)
    ex.offload_dir = store_dir
    return ex


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
