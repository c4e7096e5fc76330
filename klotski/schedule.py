"""Schedules as data: the ops of one prefill or decode step of a batch group, in issue order.

An :class:`Op` is what the runtime executes and the simulator times: an id, a kind, its layer / batch /
expert, the stream it is issued on (each stream runs its ops in order), the device a compute op runs on,
explicit cross-stream dependencies, bytes, FLOPs and its memory effect per tier (allocated at start, freed
at end). Copies name their ``link`` (``h2d``, ``d2h``, ``disk``): copies sharing a link run one at a time.

Policies (:func:`build_schedule`):

* ``layerwise`` (Accelerate-like): one batch; load a layer's weights, then compute it; no overlap.
* ``flexgen`` (zig-zag): n batches share each layer's load; the next layer's whole weights load while this
  layer computes batch by batch (``overlap=False``: load just in time).
* ``klotski`` (the Klotski paper's pipeline): the gate and hot experts prefetch during the n attentions; each gate starts the
  loads of the cold experts it discovers; experts run expert by expert over all n batches, GPU-resident and
  hot first, then cold in arrival order, each released after use.
* ``resident``: everything on the GPU, no weight traffic.

Disk-resident weights are read by the stream that loads them, tensor by tensor, into a small staging ring in
pinned memory and copied to the device from there (a ``read`` then an ``h2d`` op on that stream), as the
runtime's loader lanes do: only the experts a step selects are read, nothing is staged layers ahead. The
paper's alternative (a CPU window reading whole layers ahead) reads unselected experts too and needs
window-sized host memory; the runtime does not implement it, so the schedule does not model it.

Memory tiers: ``gpu`` (the device, also the RAM pool in CPU mode), ``cpu`` (pinned host), ``disk``.
Hidden states of the group stay on the device; norms, embeddings and the LM head are always resident.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from klotski.costs import ModelCosts
from klotski.routing_stats import GroupRouting, RoutingStats, expected_routing

POLICIES = ("layerwise", "flexgen", "klotski", "resident")
TIERS = ("gpu", "cpu", "disk")
COMPUTE_KINDS = ("attn", "gate", "expert", "experts", "shared", "lm_head")
COPY_KINDS = ("read", "h2d", "kv_load", "kv_store")


@dataclass(slots=True)  # slots: the planner builds hundreds of thousands of ops per search
class Op:
    """One step of a schedule. ``mem_alloc`` is taken at start, ``mem_free`` given back at the end."""

    id: int
    kind: str  # attn | gate | expert | experts | shared | lm_head | read | h2d | kv_load | kv_store | release
    stream: str  # compute | prefetch | expert_io | kv_load | kv_store | disk
    device: str  # compute: where it runs ("gpu" | "cpu"); copies / release: the tier written / freed
    layer: int
    batch: int | None = None
    expert: int | None = None
    tensor: str = ""  # tensor class: attn | gate | expert | shared | layer | kv | lm_head
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

    def experts_on(self, tier: str, num_experts: int) -> int:
        gpu = min(self.experts_gpu, num_experts)
        cpu = num_experts - gpu if self.experts_cpu is None else min(self.experts_cpu, num_experts - gpu)
        return {"gpu": gpu, "cpu": cpu, "disk": num_experts - gpu - cpu}[tier]

    def describe(self, num_experts: int) -> str:
        e = "/".join(str(self.experts_on(t, num_experts)) for t in TIERS)
        return (f"attn={self.attn} gate={self.gate} shared={self.shared} experts(gpu/cpu/disk)={e} "
                f"kv={self.kv}")


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


def static_memory(costs: ModelCosts, placement: Placement, shape: StepShape, policy: str) -> dict:
    """Bytes each tier holds for the whole run: placed weights, the KV cache, the group's hidden states."""
    mem = {t: 0 for t in TIERS}
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


class _Builder:
    """Appends ops in issue order; one instance per schedule."""

    def __init__(self):
        self.ops: list[Op] = []

    def add(self, kind, stream, device, layer, **kw) -> Op:
        deps = kw.pop("deps", ())
        deps = tuple(sorted({d for d in deps if d is not None})) if deps else ()
        op = Op(id=len(self.ops), kind=kind, stream=stream, device=device, layer=layer, deps=deps, **kw)
        self.ops.append(op)
        return op


def build_schedule(policy: str, costs: ModelCosts, placement: Placement, shape: StepShape,
                   routing: RoutingStats | None = None, num_hot: int | None = None, overlap: bool = True,
                   num_layers: int | None = None) -> Schedule:
    """The ops of one step under ``policy``. ``num_layers`` < model layers builds a window (first layers).

    ``num_hot``: experts the klotski policy prefetches per layer (default top_k). ``overlap``: flexgen loads
    the next layer during this one; klotski issues a layer's prefetch as soon as the layer two back has
    released its weights (instead of after the previous layer's gates, as in the paper).
    """
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
    L = costs.num_layers if num_layers is None else min(num_layers, costs.num_layers)
    b = _Builder()
    ctx = _Context(costs, placement, shape, routing, num_hot if num_hot is not None else spec.top_k,
                   early_prefetch=overlap and policy == "klotski")
    last_compute: list[int] = []
    for layer in range(L):
        if policy == "klotski":
            _klotski_layer(b, ctx, layer)
        else:
            _flexgen_layer(b, ctx, layer, overlap=overlap)
        last_compute.append(ctx.last_compute)
    seqs = shape.batch_size * shape.n
    vocab_ws = int(seqs * spec.vocab_size * 4)
    b.add("lm_head", "compute", "gpu", L, tensor="lm_head", tokens=seqs, flops=costs.lm_head_flops(seqs),
          bytes=costs.lm_head_bytes, mem_alloc={"gpu": vocab_ws}, mem_free={"gpu": vocab_ws})
    return Schedule(policy, shape, placement, b.ops, static_memory(costs, placement, shape, policy), L,
                    last_compute)


class _Context:
    """Per-schedule state carried from layer to layer."""

    def __init__(self, costs, placement, shape, routing, num_hot, early_prefetch=False):
        self.costs, self.placement, self.shape, self.routing = costs, placement, shape, routing
        self.num_hot = num_hot
        self.early_prefetch = early_prefetch
        self.attn_ids: list[int] = []  # every attention op so far, in order (KV double buffering)
        self.last_compute: int | None = None
        self.layer_release: dict[int, int] = {}  # flexgen: layer -> id of its weight release
        self.layer_issue: dict[int, int] = {}  # klotski: layer -> op after which the next layer prefetches
        self._routing_cache: dict = {}

    def group_routing(self, layer: int) -> GroupRouting:
        lc = self.costs.layers[layer]
        g = self.placement.experts_on("gpu", lc.num_experts)
        key = (self.routing._layer_key(layer), g)
        if key not in self._routing_cache:
            hot = min(self.num_hot, lc.num_experts - g)
            self._routing_cache[key] = expected_routing(self.routing, layer, self.shape.tokens_per_batch,
                                                        self.shape.n, g, hot)
        return self._routing_cache[key]


# ---- shared pieces ---------------------------------------------------------------------------------------

def _load(b: _Builder, ctx: _Context, layer: int, stream: str, tensor: str, nbytes: int, tier: str,
          deps=(), expert: int | None = None) -> int | None:
    """Load a weight living on ``tier`` into a device buffer, on ``stream`` -> id of the op that completes it.

    Host-resident (``cpu``): one CPU->GPU copy. Disk-resident: a read (``disk`` link) into a slot of the
    staging ring, then the CPU->GPU copy, one after the other on the same stream -- as the runtime's loader
    lane does it, reading only the tensors it loads (no whole-layer CPU window). The device buffer is taken
    when the load starts.
    """
    if tier == "gpu" or nbytes == 0:
        return None
    alloc = {"gpu": ctx.costs.device_bytes(nbytes, expert=tensor == "expert")}
    if tier == "disk":
        read = b.add("read", stream, "cpu", layer, tensor=tensor, expert=expert, link="disk", bytes=nbytes,
                     deps=tuple(deps), mem_alloc=alloc)
        deps, alloc = (read.id,), {}
    return b.add("h2d", stream, "gpu", layer, tensor=tensor, expert=expert, link="h2d", bytes=nbytes,
                 deps=tuple(deps), mem_alloc=alloc).id


def _release(b: _Builder, ctx: _Context, layer: int, tensor: str, nbytes: int, deps=(), expert=None) -> int | None:
    if nbytes == 0:
        return None
    return b.add("release", "compute", "gpu", layer, tensor=tensor, expert=expert, deps=deps,
                 mem_free={"gpu": ctx.costs.device_bytes(nbytes, expert=tensor == "expert")}).id


def _attention(b: _Builder, ctx: _Context, layer: int, batch: int, weights_id: int | None) -> int:
    """KV load (KV on CPU), attention, KV store for one batch; returns the attention op id."""
    costs, shape, lc = ctx.costs, ctx.shape, ctx.costs.layers[layer]
    seqs = shape.batch_size
    kv_load = kv_buf = None
    if ctx.placement.kv == "cpu":
        kv_buf = seqs * (shape.past_len + shape.q_len) * lc.kv_bytes_per_token
        two_back = ctx.attn_ids[-2] if len(ctx.attn_ids) >= 2 else None  # double buffering
        kv_load = b.add("kv_load", "kv_load", "gpu", layer, batch=batch, tensor="kv", link="h2d",
                        bytes=seqs * shape.past_len * lc.kv_bytes_per_token, deps=(two_back,),
                        mem_alloc={"gpu": kv_buf}).id
    proj, score, kv_read = costs.attn_flops(layer, seqs, shape.q_len, shape.past_len)
    attn = b.add("attn", "compute", "gpu", layer, batch=batch, tensor="attn", deps=(kv_load, weights_id),
                 tokens=seqs * shape.q_len, flops=proj, score_flops=score, bytes=lc.attn_bytes + kv_read).id
    ctx.attn_ids.append(attn)
    if kv_load is not None:
        b.add("kv_store", "kv_store", "cpu", layer, batch=batch, tensor="kv", link="d2h",
              bytes=seqs * shape.q_len * lc.kv_bytes_per_token, deps=(attn,), mem_free={"gpu": kv_buf})
    return attn


def _gate(b: _Builder, ctx: _Context, layer: int, batch: int, weights_id: int | None) -> int:
    lc, tokens = ctx.costs.layers[layer], ctx.shape.tokens_per_batch
    return b.add("gate", "compute", "gpu", layer, batch=batch, tensor="gate", deps=(weights_id,), tokens=tokens,
                 flops=ctx.costs.gate_flops(layer, tokens), bytes=lc.gate_bytes).id


def _shared(b: _Builder, ctx: _Context, layer: int, tokens: int, batch: int | None, weights_id) -> int | None:
    lc = ctx.costs.layers[layer]
    if lc.shared_bytes == 0:
        return None
    # its workspace is in the static activation estimate (ModelCosts.ffn_workspace_bytes): one compute stream
    return b.add("shared", "compute", "gpu", layer, batch=batch, tensor="shared", deps=(weights_id,),
                 tokens=tokens, flops=ctx.costs.shared_flops(layer, tokens), bytes=lc.shared_bytes).id


# ---- flexgen / layerwise / resident ----------------------------------------------------------------------

def _flexgen_layer(b: _Builder, ctx: _Context, layer: int, overlap: bool) -> None:
    lc, p, shape = ctx.costs.layers[layer], ctx.placement, ctx.shape
    # whole-layer load: waits for layer-2's buffer (overlap) or for layer-1 to finish (no overlap)
    free_after = ctx.layer_release.get(layer - (2 if overlap else 1))
    nbytes = {t: 0 for t in TIERS}
    for cls, tier in (("attn", p.attn), ("gate", p.gate), ("shared", p.shared)):
        nbytes[tier] += getattr(lc, f"{cls}_bytes")
    for tier in ("cpu", "disk"):
        nbytes[tier] += p.experts_on(tier, lc.num_experts) * lc.expert_bytes
    loads = [_load(b, ctx, layer, "prefetch", "layer", nbytes[t], t, deps=(free_after,)) for t in ("cpu", "disk")]
    loads = tuple(x for x in loads if x is not None)
    routing = ctx.group_routing(layer) if lc.kind == "moe" else None
    tokens = shape.tokens_per_batch
    for k in range(shape.n):
        _attention(b, ctx, layer, k, loads[-1] if loads else None)
        if lc.kind == "moe":
            _gate(b, ctx, layer, k, loads[-1] if loads else None)
            _shared(b, ctx, layer, tokens, k, None)
            per = routing.per_batch
            ctx.last_compute = b.add(
                "experts", "compute", "gpu", layer, batch=k, tensor="expert", tokens=tokens * lc.top_k,
                calls=per, flops=ctx.costs.expert_flops(layer, tokens * lc.top_k), bytes=per * lc.expert_bytes).id
        else:
            ctx.last_compute = _shared(b, ctx, layer, tokens, k, None)
    loaded = sum(nbytes[t] for t in ("cpu", "disk"))
    rel = _release(b, ctx, layer, "layer", loaded)
    ctx.layer_release[layer] = rel if rel is not None else ctx.last_compute


# ---- klotski -----------------------------------------------------------------------------------------------

def _klotski_layer(b: _Builder, ctx: _Context, layer: int) -> None:
    costs, lc, p, shape = ctx.costs, ctx.costs.layers[layer], ctx.placement, ctx.shape
    if ctx.early_prefetch:  # flexgen-like: as soon as layer-2 has released its weights (two layers in flight)
        issue = ctx.layer_release.get(layer - 2)
    else:  # the paper's order: once layer-1's gates have issued its cold loads
        issue = ctx.layer_issue.get(layer - 1)
    attn_w = _load(b, ctx, layer, "prefetch", "attn", lc.attn_bytes, p.attn, deps=(issue,))
    gate_w = _load(b, ctx, layer, "prefetch", "gate", lc.gate_bytes, p.gate, deps=(issue,))
    routing = ctx.group_routing(layer) if lc.kind == "moe" else None
    hot_w: dict[int, int | None] = {}
    if routing is not None:
        # hot experts: the prefetch set (used and unused), most popular first; tier by popularity rank
        g = p.experts_on("gpu", lc.num_experts)
        hot_ids = [e for e, _ in routing.hot] + list(routing.hot_unused)
        ranks = {int(e): r for r, e in enumerate(ctx.routing.hot_experts(layer, lc.num_experts))}
        for e in sorted(hot_ids, key=lambda e: ranks[e]):
            tier = "cpu" if ranks[e] < g + p.experts_on("cpu", lc.num_experts) else "disk"
            hot_w[e] = _load(b, ctx, layer, "prefetch", "expert", lc.expert_bytes, tier, deps=(issue,), expert=e)
    shared_w = _load(b, ctx, layer, "prefetch", "shared", lc.shared_bytes, p.shared, deps=(issue,))
    cold_w: dict[int, int | None] = {}
    cold_by_batch: dict[int, list] = {}
    if routing is not None:
        for e, tok, first in routing.cold:
            cold_by_batch.setdefault(first, []).append((e, tok))
        g_cpu = p.experts_on("gpu", lc.num_experts) + p.experts_on("cpu", lc.num_experts)
        ranks = {int(e): r for r, e in enumerate(ctx.routing.hot_experts(layer, lc.num_experts))}
    last_gate = None
    for k in range(shape.n):
        attn = _attention(b, ctx, layer, k, attn_w)
        if routing is not None:
            last_gate = _gate(b, ctx, layer, k, gate_w)
            for e, _ in cold_by_batch.get(k, ()):
                tier = "cpu" if ranks[e] < g_cpu else "disk"
                cold_w[e] = _load(b, ctx, layer, "expert_io", "expert", lc.expert_bytes, tier, deps=(last_gate,),
                                 expert=e)
        ctx.last_compute = attn if routing is None else last_gate
    ctx.layer_issue[layer] = last_gate if last_gate is not None else ctx.last_compute
    if attn_w is not None:
        _release(b, ctx, layer, "attn", lc.attn_bytes, deps=())
    if gate_w is not None:
        _release(b, ctx, layer, "gate", lc.gate_bytes)
    total = shape.tokens_per_batch * shape.n
    sh = _shared(b, ctx, layer, total, None, shared_w)
    if sh is not None:
        ctx.last_compute = sh
        if shared_w is not None:
            _release(b, ctx, layer, "shared", lc.shared_bytes)
    if routing is None:
        return
    for e in routing.hot_unused:  # prefetched but not selected: give the buffer back at once
        _release(b, ctx, layer, "expert", lc.expert_bytes if hot_w.get(e) is not None else 0, expert=e)
    runs = [(e, t, None) for e, t in routing.resident] + [(e, t, hot_w.get(e)) for e, t in routing.hot]
    runs += [(e, t, cold_w.get(e)) for e, t, _ in routing.cold]
    for e, tok, w in runs:
        ctx.last_compute = b.add("expert", "compute", "gpu", layer, expert=e, tensor="expert", deps=(w,),
                                 tokens=tok, flops=costs.expert_flops(layer, tok), bytes=lc.expert_bytes).id
        if w is not None:
            rel = _release(b, ctx, layer, "expert", lc.expert_bytes, expert=e)
            ctx.layer_release[layer] = rel
    ctx.layer_release.setdefault(layer, ctx.last_compute)
