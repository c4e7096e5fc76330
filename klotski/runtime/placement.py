"""Decide what lives where under a memory budget, and how many device slots each stream gets.

Tensor classes of one layer (by canonical weight name): ``norm`` (always on the device), ``attn``, ``gate``
(router), ``shared`` (shared experts, or a dense layer's MLP) and the routed experts. Tiers follow
:class:`klotski.schedule.Placement` ("gpu" = the device, "cpu" = host memory, "disk").

:func:`layout_memory` turns a placement into device/host byte needs plus pool sizes: ``dense_buffers`` (device
copies of a layer's streamed attn/gate/shared weights: 2 lets the next layer load during this one) and
``expert_slots`` (streaming expert slots; how many each order needs is :mod:`klotski.program.pools`).
The placement itself comes from the planner (:mod:`klotski.runtime.planning`); this module only measures
what a placement needs in bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.model.weights import CheckpointWeights
from klotski.schedule import Placement

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
        spec = weights.spec
        glob = sum(_numel(s.shapes) for s in weights.globals.values()) * size
        per, per_ckpt = [], []
        for sources in weights.layers:
            d, c = {k: 0 for k in ("norm", *CLASSES)}, {k: 0 for k in ("norm", *CLASSES)}
            for key, src in sources.items():
                d[tensor_class(key)] += _numel(src.shapes) * size
                c[tensor_class(key)] += sum(weights.info(n).stored_nbytes for n in src.names)  # fp8: + scales
            per.append(d)
            per_ckpt.append(c)
        expert = expert_ckpt = 0
        if spec.moe_layers:
            w13, w2 = weights.expert_pieces(spec.moe_layers[0], 0)
            expert_ckpt = sum(p.stored_nbytes for p in w13) + w2.stored_nbytes
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
