"""Cheap bounds for the planner's search: a candidate that cannot beat the incumbent is never simulated.

:func:`step_time_lower_bound` bounds the simulated makespan of one step of a candidate (policy, batch size,
n, KV tier, prefetch width) from below without building its schedule, for *any* weight placement that fits
the GPU. Two bounds, the larger wins:

* compute: the compute stream runs its ops one at a time, so the step takes at least the sum of the ops
  every placement has (attention and gates of each batch, shared experts / dense MLPs, the LM head; routed
  experts are left out), each timed by :func:`~klotski.costs.op_seconds` exactly as the simulator does;
* host-to-device link: the KV loads of the step (KV in CPU memory), plus every weight the step uses that is
  not GPU-resident. What can be resident is at most the GPU memory left once the leanest placement's static
  memory is taken, so at least ``used - capacity`` bytes cross the link. ``flexgen`` / ``layerwise`` load
  every non-resident expert; ``klotski`` loads its prefetch set and the used cold experts, at least
  ``expected_distinct - 1`` experts of a layer minus the resident ones (three roundings of half an expert).

Both assume every compute op runs on the GPU; a candidate that may compute attention or cold experts on the
CPU (``host_relaxed``) leaves them out of both bounds. ``tests/planner/test_plan_bounds.py`` checks the bound
against full simulations.
"""
from __future__ import annotations

from klotski.costs import op_seconds
from klotski.schedule import Op, Placement, StepShape, static_memory


def step_time_lower_bound(costs, hw, routing, policy: str, shape: StepShape, kv: str, num_hot: int | None,
                          lean_static_gpu: int, dtype: str | None = None, host_relaxed: bool = False) -> float:
    """Seconds one step of ``shape`` takes at least under ``policy`` (see the module docstring).

    ``lean_static_gpu``: the step's static GPU bytes with no weight class placed on the GPU (the smallest
    static memory of any placement of this candidate); what the GPU can hold beyond it bounds the resident
    weights. ``host_relaxed``: the candidate may compute attention and cold experts on the CPU
    (:mod:`klotski.program.host`): attention, KV loads and routed experts are then left out of the bound.
    """
    dtype = dtype or costs.act_dtype
    n = 1 if policy in ("layerwise", "resident") else shape.n
    b, q = shape.batch_size, shape.q_len
    tokens = b * q
    compute = 0.0
    kv_link = 0.0
    used = 0.0  # stored bytes of the weights the step computes with
    kv_on_cpu = kv == "cpu" and policy != "resident"
    for lc in costs.layers:
        i = lc.index
        proj, score, kv_read = costs.attn_flops(i, b, q, shape.past_len)
        attn = Op(0, "attn", "compute", "gpu", i, tokens=tokens, flops=proj, score_flops=score,
                  bytes=lc.attn_bytes + kv_read)
        if not host_relaxed:
            compute += n * op_seconds(attn, hw, dtype)
        used += lc.attn_bytes + lc.shared_bytes
        if kv_on_cpu and not host_relaxed:
            load = Op(0, "kv_load", "kv_load", "gpu", i, link="h2d", bytes=b * shape.past_len * lc.kv_bytes_per_token)
            kv_link += n * op_seconds(load, hw, dtype)
        if lc.shared_bytes:
            if policy == "klotski":  # one call over the whole group
                compute += op_seconds(Op(0, "shared", "compute", "gpu", i, tokens=tokens * n,
                                         flops=costs.shared_flops(i, tokens * n), bytes=lc.shared_bytes), hw, dtype)
            else:
                compute += n * op_seconds(Op(0, "shared", "compute", "gpu", i, tokens=tokens,
                                             flops=costs.shared_flops(i, tokens), bytes=lc.shared_bytes), hw, dtype)
        if lc.kind != "moe":
            continue
        gate = Op(0, "gate", "compute", "gpu", i, tokens=tokens, flops=costs.gate_flops(i, tokens), bytes=lc.gate_bytes)
        compute += n * op_seconds(gate, hw, dtype)
        used += lc.gate_bytes
        if policy == "klotski" and num_hot is not None and num_hot < lc.num_experts:
            experts = max(0.0, routing.expected_distinct(tokens * n, i) - 1.0)
        else:
            experts = lc.num_experts
        if not host_relaxed:
            used += experts * lc.expert_bytes
    seqs = b * n
    compute += op_seconds(Op(0, "lm_head", "compute", "gpu", costs.num_layers, tokens=seqs,
                             flops=costs.lm_head_flops(seqs), bytes=costs.lm_head_bytes), hw, dtype)
    # device bytes per stored byte of a resident weight (1 when experts stay as stored: a lower bound still)
    scale = 1.0 if getattr(costs, "experts_as_stored", False) else getattr(costs, "device_scale", 1.0)
    capacity = max(0.0, (hw.gpu_memory - lean_static_gpu + 1) / scale)
    link = kv_link + max(0.0, used - capacity) / hw.h2d_bandwidth
    return max(compute, link)


def lean_static_gpu(costs, shape: StepShape, kv: str, policy: str) -> int:
    """Static GPU bytes of the leanest placement (attention, gates, shared and routed experts off the GPU)."""
    lean = Placement(attn="cpu", gate="cpu", shared="cpu", experts_gpu=0, kv=kv)
    return static_memory(costs, lean, shape, policy)["gpu"]
