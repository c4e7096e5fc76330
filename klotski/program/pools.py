"""The device pools a policy's order needs: one rule, read by the planner, the simulator and the runtime.

* dense buffers: device copies of a layer's streamed attention / gate / shared weights; two let the next
  layer load during this one;
* streaming expert slots: where non-resident routed experts are loaded (GPU-resident experts have slots of
  their own). FlexGen and layerwise load every streamed expert of a layer (twice that with FlexGen's
  overlap: two layers in flight); klotski needs one at least and uses up to its prefetch width plus the cold
  experts of a gate;
* KV staging buffers (a KV cache in host memory, attention on the device): :func:`kv_staging_buffers`.
"""
from __future__ import annotations


def slot_targets(policy: str, spec, experts_gpu: int = 0, num_hot: int | None = None,
                 overlap: bool = True) -> tuple[int, int, int]:
    """(minimum streaming expert slots, target slots, target dense buffers) of a policy when ``experts_gpu``
    experts of every MoE layer are resident: only the others stream (none when all are resident)."""
    E, K = spec.num_experts, max(spec.top_k, 1)
    if not spec.moe_layers:
        return 0, 0, 2 if policy != "layerwise" else 1
    streamed = max(0, E - experts_gpu)
    if streamed == 0:
        return 0, 0, 2 if policy != "layerwise" else 1
    if policy == "klotski":
        hot = K if num_hot is None else num_hot
        return 1, min(2 * streamed, hot + K + 2), 2
    if policy == "flexgen":
        return streamed, (2 if overlap else 1) * streamed, 2 if overlap else 1
    if policy == "layerwise":
        return streamed, streamed, 1
    raise ValueError(f"unknown offloading policy {policy!r}; available: layerwise, flexgen, klotski")


def pools_for(policy: str, spec, placement, num_hot: int | None, overlap: bool) -> tuple[int, int]:
    """(dense buffers, streaming expert slots) the runtime allocates for a plan: the policy's targets for
    its placement (``policy``: the order it runs in, :func:`klotski.program.order_of`)."""
    E = spec.num_experts
    _, slots, buffers = slot_targets("flexgen" if policy == "resident" else policy, spec,
                                     placement.experts_on("gpu", E) if E else 0, num_hot, overlap)
    return buffers, slots


def kv_staging_buffers(policy: str, n: int) -> int:
    """Device staging buffers for a KV cache in host memory (a micro-batch's layer each), with ``n``
    micro-batches per group. FlexGen's design double-buffers (the next micro-batch's KV loads during this
    one's attention). The klotski order keeps one per micro-batch: once a layer's gates have run, the next
    layer's KV loads all go out, each into the buffer its micro-batch's KV store of this layer frees, and
    arrive while this layer's experts run (with two, every micro-batch past the second waits for a store of
    its own layer: copies on the critical path between the experts of two layers). A placement may ask for two
    instead (``Placement.kv_buffers``: the planner does where the order's own number costs device memory it
    would rather spend otherwise)."""
    return max(2, n) if policy == "klotski" else 2
