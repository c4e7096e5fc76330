"""Decide what lives where under a memory budget, and how many device slots each stream gets.

Tensor classes of one layer (by canonical weight name): ``norm`` (always on the device), ``attn``, ``gate``
(router), ``shared`` (shared experts, or a dense layer's MLP) and the routed experts. Tiers follow
:class:`klotski.schedule.Placement` ("gpu" = the device, "cpu" = host memory, "disk").

:func:`layout_memory` turns a placement into device/host byte needs plus pool sizes: ``dense_buffers`` (device
copies of a layer's streamed attn/gate/shared weights: 2 lets the next layer load during this one) and
``expert_slots`` (streaming expert slots; flexgen and layerwise need a whole layer, klotski only one).
:func:`auto_placement` fills the device, then host memory, greedily and raises :class:`BudgetError` with the
minimum when the device cannot hold one layer's working set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.runtime.memory import BudgetError
from klotski.schedule import Placement
from klotski.units import format_bytes

CLASSES = ("attn", "gate", "shared")
NORMS = ("input_norm", "post_attn_norm")


def tensor_class(key: str) -> str:
    if key in NORMS:
        return "norm"
    if key.startswith("router"):
        return "gate"
    if key.startswith(("shared_", "dense_")):
        return "shared"
    return "attn"


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of each tensor class in the compute dtype (device) and the checkpoint dtype (host/disk)."""

    globals: int
    per_layer: tuple[dict, ...]  # layer -> {class: compute-dtype bytes}
    per_layer_ckpt: tuple[dict, ...]  # layer -> {class: checkpoint-dtype bytes}
    expert: int  # one routed expert, compute dtype
    expert_ckpt: int
    moe_layers: tuple[int, ...]
    num_experts: int

    @classmethod
    def of(cls, weights: CheckpointWeights, dtype: torch.dtype) -> "ModelBytes":
        size = torch.empty((), dtype=dtype).element_size()
        index, spec = weights.index, weights.spec
        glob = sum(_numel(s.shapes) for s in weights.globals.values()) * size
        per, per_ckpt = [], []
        for sources in weights.layers:
            d, c = {k: 0 for k in ("norm", *CLASSES)}, {k: 0 for k in ("norm", *CLASSES)}
            for key, src in sources.items():
                d[tensor_class(key)] += _numel(src.shapes) * size
                c[tensor_class(key)] += sum(index[n].nbytes for n in src.names)
            per.append(d)
            per_ckpt.append(c)
        expert = expert_ckpt = 0
        if spec.moe_layers:
            w13, w2 = weights.expert_pieces(spec.moe_layers[0], 0)
            expert_ckpt = sum(p.nbytes for p in w13) + w2.nbytes
            expert = 3 * spec.hidden_size * spec.moe_intermediate_size * size
        return cls(glob, tuple(per), tuple(per_ckpt), expert, expert_ckpt, tuple(spec.moe_layers),
                   spec.num_experts if spec.moe_layers else 0)


def _numel(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


@dataclass(frozen=True)
class Layout:
    """A placement plus the device pool sizes and what each tier holds for weights (bytes)."""

    placement: Placement
    dense_buffers: int
    expert_slots: int  # streaming slots (GPU-resident experts have slots of their own)
    device_bytes: int  # globals + norms + resident classes + resident experts + buffers + slots
    host_bytes: int  # host-tier classes and experts (checkpoint dtype)

    def describe(self, num_experts: int) -> str:
        return (f"{self.placement.describe(num_experts)} dense_buffers={self.dense_buffers} "
                f"expert_slots={self.expert_slots}")


def streamed_bytes(mb: ModelBytes, placement: Placement) -> int:
    """The largest per-layer sum of the classes not resident on the device (what one dense buffer holds)."""
    return max((sum(v for k, v in d.items() if k in CLASSES and getattr(placement, k) != "gpu")
                for d in mb.per_layer), default=0)


def layout_memory(mb: ModelBytes, placement: Placement, dense_buffers: int, expert_slots: int) -> Layout:
    dev = mb.globals + sum(d["norm"] for d in mb.per_layer)
    host = 0
    for d, c in zip(mb.per_layer, mb.per_layer_ckpt):
        for k in CLASSES:
            tier = getattr(placement, k)
            if tier == "gpu":
                dev += d[k]
            elif tier == "cpu":
                host += c[k]
    buffers = dense_buffers if streamed_bytes(mb, placement) else 0
    dev += buffers * streamed_bytes(mb, placement)
    E = mb.num_experts
    n_moe = len(mb.moe_layers)
    dev += (n_moe * placement.experts_on("gpu", E) + expert_slots) * mb.expert
    host += n_moe * placement.experts_on("cpu", E) * mb.expert_ckpt
    return Layout(placement, buffers, expert_slots, dev, host)


def slot_targets(policy: str, spec: ModelSpec) -> tuple[int, int, int]:
    """(minimum streaming expert slots, target slots, target dense buffers) of a policy."""
    E, K = spec.num_experts, max(spec.top_k, 1)
    if not spec.moe_layers:
        return 0, 0, 2 if policy != "layerwise" else 1
    if policy == "klotski":
        return 1, min(2 * E, 2 * K + 2), 2
    if policy == "flexgen":
        return E, 2 * E, 2
    if policy == "layerwise":
        return E, E, 1
    raise ValueError(f"unknown offloading policy {policy!r}; available: layerwise, flexgen, klotski")


def auto_placement(mb: ModelBytes, spec: ModelSpec, policy: str, gpu_budget: int, cpu_budget: int,
                   reserve_gpu: int, reserve_cpu: int) -> Layout:
    """Greedy placement: device first (working set, then buffers, slots, attn/gate/shared, hot experts),
    then host memory (attn/gate/shared, then experts), the rest on disk.

    ``reserve_gpu`` / ``reserve_cpu``: bytes kept free for activations / KV and staging buffers.
    """
    E = mb.num_experts
    min_slots, target_slots, target_buffers = slot_targets(policy, spec)
    off = Placement(attn="disk", gate="disk", shared="disk", experts_gpu=0, experts_cpu=0, kv="gpu")
    minimum = layout_memory(mb, off, 1, min_slots)
    if minimum.device_bytes + reserve_gpu > gpu_budget:
        one_layer = streamed_bytes(mb, off) + min_slots * mb.expert
        raise BudgetError(
            f"gpu_memory {format_bytes(gpu_budget)} is too small for one layer's working set under policy "
            f"{policy!r}: needs at least {format_bytes(minimum.device_bytes + reserve_gpu)} "
            f"(embeddings/LM head/norms {format_bytes(mb.globals + sum(d['norm'] for d in mb.per_layer))}, "
            f"one layer's attention+gate+shared and {min_slots} expert slot(s) {format_bytes(one_layer)}, "
            f"activations {format_bytes(reserve_gpu)})"
        )

    def fits(p: Placement, buffers: int, slots: int) -> bool:
        lay = layout_memory(mb, p, buffers, slots)
        return lay.device_bytes + reserve_gpu <= gpu_budget

    p, buffers, slots = off, 1, min_slots
    if target_buffers > 1 and fits(p, 2, slots):
        buffers = 2
    while slots < target_slots and fits(p, buffers, slots + 1):
        slots += 1
    for cls in ("gate", "attn", "shared"):
        cand = _replace(p, **{cls: "gpu"})
        if fits(cand, buffers, slots):
            p = cand
    n_moe = len(mb.moe_layers)
    if n_moe and policy != "layerwise":
        g = 0
        while g < E and fits(_replace(p, experts_gpu=g + 1), buffers, slots):
            g += 1
        p = _replace(p, experts_gpu=g)
    # host memory
    host_left = cpu_budget - reserve_cpu
    for cls in ("gate", "attn", "shared"):
        if getattr(p, cls) == "gpu":
            continue
        need = sum(c[cls] for c in mb.per_layer_ckpt)
        if need <= host_left:
            p = _replace(p, **{cls: "cpu"})
            host_left -= need
    c = 0
    if n_moe and mb.expert_ckpt:
        c = min(E - p.experts_gpu, max(0, host_left) // (n_moe * mb.expert_ckpt))
    p = _replace(p, experts_cpu=int(c))
    return layout_memory(mb, p, buffers, slots)


def _replace(p: Placement, **kw) -> Placement:
    from dataclasses import replace

    return replace(p, **kw)
