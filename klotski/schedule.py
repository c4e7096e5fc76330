"""Schedules as data: the ops of one prefill or decode step of a batch group, in issue order.

An :class:`Op` is what the runtime executes and the simulator times: an id, a kind, its layer / batch /
expert, the stream it is issued on (each stream runs its ops in order), the device a compute op runs on,
explicit cross-stream dependencies, bytes, FLOPs and its memory effect per tier (allocated at start, freed
at end). Copies name their ``link`` (``h2d``, ``d2h``, ``disk``): copies sharing a link run one at a time.

Each policy's order is built by its op builder in :mod:`klotski.program` -- the same builder the runtime
executes (with the routing its gates produce), so what is simulated is what runs:

* ``layerwise`` (Accelerate-like): one micro-batch at a time; load a layer's weights, then compute it.
* ``flexgen`` (zig-zag): n batches share each layer's load; with ``overlap`` the next layer's whole weights
  load while this layer computes (without it: just in time).
* ``klotski`` (the Klotski paper's pipeline): dense weights a layer ahead, the predicted hot experts after the
  previous layer's gates; each gate starts the loads of the cold experts it discovers; experts run expert by
  expert over all n batches, GPU-resident and hot first, then cold in issue order, each released after use.
* ``resident``: everything on the GPU, no weight traffic.

Disk-resident weights are read by the lane that loads them into a small staging ring in pinned memory and
copied to the device from there (a ``read`` then an ``h2d`` op on that stream): only the experts a step
selects are read, nothing is staged layers ahead. The paper's alternative (a CPU window reading whole layers
ahead) reads unselected experts too and needs window-sized host memory; the runtime does not implement it,
so the schedule does not model it.

Memory tiers: ``gpu`` (the device, also the RAM pool in CPU mode), ``cpu`` (pinned host), ``disk``.
Hidden states of the group stay on the device; norms, embeddings and the LM head are always resident.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from klotski.costs import ModelCosts
from klotski.routing_stats import RoutingStats

POLICIES = ("layerwise", "flexgen", "klotski", "resident")
TIERS = ("gpu", "cpu", "disk")
COMPUTE_KINDS = ("attn", "gate", "expert", "experts", "shared", "lm_head", "attn_qkv", "attn_core", "attn_out")
COPY_KINDS = ("read", "h2d", "kv_load", "kv_store", "act_d2h", "act_h2d")  # act_*: activations to / from the host


@dataclass(slots=True)  # slots: the planner builds hundreds of thousands of ops per search
class Op:
    """One step of a schedule. ``mem_alloc`` is taken at start, ``mem_free`` given back at the end."""

    id: int
    kind: str  # attn | gate | expert | experts | shared | lm_head | read | h2d | kv_load | kv_store | release
    # | attn_qkv / attn_core / attn_out (attention split around the host) | act_d2h / act_h2d (activations)
    stream: str  # compute | prefetch | expert_io | kv_load | kv_store | cpu_attn | cpu_experts
    device: str  # compute: where it runs ("gpu" | "cpu"); copies / release: the tier written / freed
    layer: int
    batch: int | None = None
    expert: int | None = None
    experts: tuple[int, ...] = ()  # a load or call over several experts
    tensor: str = ""  # attn | gate | expert | experts | shared | dense | kv | lm_head
    deps: tuple[int, ...] = ()
    bytes: int = 0  # copies: bytes moved; compute: bytes read from memory (weights, KV)
    flops: float = 0.0  # matmul FLOPs
    score_flops: float = 0.0  # attention QK^T / PV FLOPs
    tokens: int = 0
    calls: int = 1  # kernel launches (an ``experts`` op loops over several experts)
    link: str | None = None  # h2d | d2h | disk for copies
    mem_alloc: dict = field(default_factory=dict)
    mem_free: dict = field(default_factory=dict)
    duration: float | None = None  # fixed seconds (tests, measured replays); None: from the cost model
    contended: float = 0.0  # a measured op: share of its time another lane ran on the same cores (CPU mode)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS


@dataclass(frozen=True)
class Placement:
    """Where each tensor class lives. Tiers: "gpu" | "cpu" | "disk" (KV: "gpu" | "cpu").

    Routed experts: the ``experts_gpu`` most popular of every MoE layer are GPU-resident, the next
    ``experts_cpu`` (None: all the rest) live in pinned CPU memory, the remainder on disk.
    """

    attn: str = "gpu"
    gate: str = "gpu"
    shared: str = "gpu"  # shared experts, and the MLP of dense layers
    experts_gpu: int = 0
    experts_cpu: int | None = None
    kv: str = "gpu"
    prefill_chunk: int | None = None  # prompt columns per prefill pass the device memory was sized for (None:
    # the whole prompt; klotski.prefill_chunks: the runtime chunks a prefill whose activations do not fit)
    kv_buffers: int | None = None  # device KV staging buffers over a host KV cache (None: the order's own number,
    # klotski.program.pools.kv_staging_buffers; the planner sets 2 where that many cost device memory it would
    # rather spend otherwise)

    def experts_on(self, tier: str, num_experts: int) -> int:
        gpu = min(self.experts_gpu, num_experts)
        if tier == "gpu":
            return gpu
        cpu = num_experts - gpu if self.experts_cpu is None else min(self.experts_cpu, num_experts - gpu)
        if tier == "cpu":
            return cpu
        if tier == "disk":
            return num_experts - gpu - cpu
        raise KeyError(tier)

    def describe(self, num_experts: int) -> str:
        e = "/".join(str(self.experts_on(t, num_experts)) for t in TIERS)
        return (f"attn={self.attn} gate={self.gate} shared={self.shared} experts(gpu/cpu/disk)={e} "
                f"kv={self.kv}" + (f" prefill_chunk={self.prefill_chunk}" if self.prefill_chunk else "")
                + (f" kv_buffers={self.kv_buffers}" if self.kv_buffers else ""))


@dataclass(frozen=True)
class StepShape:
    """One step of a batch group: ``n`` batches of ``batch_size`` sequences, ``q_len`` new tokens each."""

    phase: str  # "prefill" | "decode"
    batch_size: int
    n: int
    q_len: int
    past_len: int
    context_len: int  # KV length at the end of generation (sizes the KV cache)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.q_len


@dataclass
class Schedule:
    policy: str
    shape: StepShape
    placement: Placement
    ops: list[Op]
    static_mem: dict  # tier -> bytes held for the whole step (resident weights, KV cache, activations)
    num_layers: int  # layers this schedule covers (a window of the model when extrapolating)
    layer_last_compute: list[int]  # per layer: id of its last compute op

    def ops_by_stream(self) -> dict[str, list[Op]]:
        out: dict[str, list[Op]] = {}
        for op in self.ops:
            out.setdefault(op.stream, []).append(op)
        return out


def pool_bytes(costs: ModelCosts, placement: Placement, dense_buffers: int, expert_slots: int) -> int:
    """Device bytes of the runtime's fixed pools: ``dense_buffers`` copies of the largest layer's streamed
    attention / gate / shared weights and ``expert_slots`` streaming expert slots (device dtype)."""
    streamed = max((sum(getattr(lc, f"{c}_bytes") for c in ("attn", "gate", "shared") if getattr(placement, c) != "gpu")
                    for lc in costs.layers), default=0)
    expert = max((lc.expert_bytes for lc in costs.layers if lc.kind == "moe"), default=0)
    return (dense_buffers * costs.device_bytes(streamed) if streamed else 0) + \
        expert_slots * costs.device_bytes(expert, expert=True)


def static_memory(costs: ModelCosts, placement: Placement, shape: StepShape, policy: str,
                  pools: tuple[int, int] = (0, 0)) -> dict:
    """Bytes each tier holds for the whole run: placed weights, the runtime's pools (``pools`` = (dense
    buffers, streaming expert slots)), the KV cache, the group's hidden states."""
    mem = {t: 0 for t in TIERS}
    mem["gpu"] += pool_bytes(costs, placement, *pools)
    gpu_weights = costs.embed_bytes + costs.lm_head_bytes
    gpu_experts = 0
    seqs = shape.batch_size * shape.n
    for lc in costs.layers:
        gpu_weights += lc.norm_bytes
        for cls, tier in (("attn", placement.attn), ("gate", placement.gate), ("shared", placement.shared)):
            if tier == "gpu":
                gpu_weights += getattr(lc, f"{cls}_bytes")
            else:
                mem[tier] += getattr(lc, f"{cls}_bytes")
        gpu_experts += placement.experts_on("gpu", lc.num_experts) * lc.expert_bytes
        for tier in ("cpu", "disk"):
            mem[tier] += placement.experts_on(tier, lc.num_experts) * lc.expert_bytes
    mem["gpu"] += costs.device_bytes(gpu_weights)  # weights on the device are in its dtype
    mem["gpu"] += costs.device_bytes(gpu_experts, expert=True)  # (int4 experts: as stored)
    mem["cpu"] += staging_bytes(costs, placement)
    mem[placement.kv] += costs.kv_bytes(seqs * shape.context_len)
    # the group's transient activations: the same estimate the runtime checks a forward against
    n = 1 if policy in ("layerwise", "resident") else shape.n
    mem["gpu"] += max(2 * costs.hidden_bytes(seqs * shape.q_len),
                      costs.activation_bytes(seqs, n, shape.q_len, shape.past_len + shape.q_len))
    return mem


STAGING_SLOTS = 2  # the runtime's staging ring: one slot per loader lane that reads from disk
STAGING_PAD = 16384  # per slot: room to round an unaligned read out to 4 KiB pages at both ends


def staging_bytes(costs: ModelCosts, placement: Placement) -> int:
    """Pinned host memory of the staging ring disk reads land in: ``STAGING_SLOTS`` slots, each the largest
    disk-resident piece (an expert, or a layer's attention / gate / shared weights) rounded out to pages;
    0 when nothing lives on disk."""
    piece = 0
    for lc in costs.layers:
        if placement.experts_on("disk", lc.num_experts):
            piece = max(piece, lc.expert_bytes)
        for cls in ("attn", "gate", "shared"):
            if getattr(placement, cls) == "disk":
                piece = max(piece, getattr(lc, f"{cls}_bytes"))
    if piece == 0:
        return 0
    return STAGING_SLOTS * (-(-(piece + STAGING_PAD) // 4096) * 4096)


def build_schedule(policy: str, costs: ModelCosts, placement: Placement, shape: StepShape,
                   routing: RoutingStats | None = None, num_hot: int | None = None, overlap: bool = True,
                   num_layers: int | None = None, dense_buffers: int | None = None,
                   expert_slots: int | None = None, host=None, expert_rule=None,
                   kv_buffers: int | None = None) -> Schedule:
    """The ops of one step under ``policy``, built by the policy's op builder (:mod:`klotski.program`) from the
    expected ``routing``. ``num_layers`` < model layers builds a window (first layers).

    ``num_hot``: experts the klotski policy prefetches per layer (default top_k). ``overlap``: flexgen loads
    the next layer during this one; klotski issues the next layer's hot experts with its weights ("wide,
    early"). ``dense_buffers`` / ``expert_slots``: the runtime's pools (default: the policy's targets,
    :func:`klotski.program.pools.pools_for`); ``kv_buffers``: its KV staging buffers (default: the placement's,
    else :func:`klotski.program.pools.kv_staging_buffers`). ``host``: a :class:`klotski.program.host.HostCompute` (attention
    per phase and cold experts on the CPU; None: everything on the device); ``expert_rule``: its
    :class:`~klotski.program.host.ExpertRule` (needed for ``experts="auto"``).
    """
    from klotski.program import Builder, ExpectedRouting, StepContext, step_ops
    from klotski.program.pools import kv_staging_buffers, pools_for

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}")
    if placement.kv not in ("gpu", "cpu"):
        raise ValueError(f"placement.kv must be 'gpu' or 'cpu', got {placement.kv!r}")
    spec = costs.spec
    routing = routing or RoutingStats.uniform(max(spec.num_experts, 1), max(spec.top_k, 1))
    if policy == "resident":
        placement = Placement(kv="gpu", experts_gpu=spec.num_experts)
        shape = StepShape(shape.phase, shape.batch_size, 1, shape.q_len, shape.past_len, shape.context_len)
    if policy == "layerwise":
        shape = StepShape(shape.phase, shape.batch_size, 1, shape.q_len, shape.past_len, shape.context_len)
        overlap = False
    if dense_buffers is None or expert_slots is None:
        buffers, slots = pools_for(policy, spec, placement, num_hot, overlap)
        dense_buffers = buffers if dense_buffers is None else dense_buffers
        expert_slots = slots if expert_slots is None else expert_slots
    from klotski.program.host import HostCompute

    host = HostCompute() if host is None or policy == "resident" else host
    ctx = StepContext(costs, placement, shape, num_hot if num_hot is not None else spec.top_k, overlap,
                      dense_buffers=dense_buffers, expert_slots=expert_slots,
                      kv_buffers=kv_buffers or placement.kv_buffers or kv_staging_buffers(policy, shape.n), num_layers=num_layers, host=host,
                      expert_rule=expert_rule)
    b = Builder(ctx)
    for _ in step_ops(policy, b, ExpectedRouting(routing, placement, shape)):
        pass
    return Schedule(policy, shape, placement, b.ops,
                    static_memory(costs, placement, shape, policy, (dense_buffers, expert_slots)), ctx.layers,
                    b.layer_last_compute)
