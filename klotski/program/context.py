"""What every policy's op builder shares: the step's context, the op list being built, and the op emitters.

An op builder (:mod:`klotski.program.layerwise`, :mod:`~klotski.program.flexgen`,
:mod:`~klotski.program.klotski`) is a generator: it yields each :class:`~klotski.schedule.Op` as soon as it
is built, in issue order, and reads the routing from a :class:`~klotski.program.routing.RoutingView` only
after yielding the gate it depends on. The simulator collects the ops with the expected routing; the runtime
executes each op as it is yielded, so when the builder resumes after a gate the view holds the routing that
gate just produced.

Emitters here are generators too (``op_id = yield from load_dense(...)``); each returns the id of the op a
consumer depends on (or None when nothing was emitted).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from klotski.costs import ModelCosts
from klotski.program.host import ExpertRule, HostCompute
from klotski.schedule import COMPUTE_KINDS, Op, Placement, StepShape

HOST_TIERS = ("cpu", "disk")  # cold experts the CPU may compute: in place in host memory, or after their read
_COMPUTE = frozenset(COMPUTE_KINDS)
LOAD_LANES = ("prefetch", "expert_io")  # weight loads; KV moves have lanes of their own (kv_load, kv_store)


@dataclass
class StepContext:
    """One step of a batch group under one plan: everything a builder reads besides the routing.

    ``dense_buffers`` / ``expert_slots`` / ``kv_buffers``: the device pools (a layer's streamed dense weights;
    streaming expert slots, None: unbounded; KV staging buffers, :func:`~klotski.program.pools.kv_staging_buffers`);
    ``kv``: where the group's KV cache lives ("gpu" | "cpu");
    ``num_hot``: experts the klotski order prefetches per MoE layer; ``overlap``: flexgen loads the next
    layer during this one, klotski issues the next layer's hot experts with its weights ("wide, early").
    """

    costs: ModelCosts
    placement: Placement
    shape: StepShape
    num_hot: int
    overlap: bool
    dense_buffers: int = 2
    expert_slots: int | None = None
    kv_buffers: int = 2
    num_layers: int | None = None  # a window of the first layers (the simulator's extrapolation)
    host: HostCompute = field(default_factory=HostCompute)  # attention per phase, cold experts on the CPU
    expert_rule: ExpertRule | None = None  # the cold-expert decision (host.experts == "auto")

    @property
    def attn_device(self) -> str:
        """Where this step's attention runs: the plan's choice for its phase, on the CPU only over a KV cache in
        host memory."""
        return self.host.attn(self.shape.phase) if self.placement.kv == "cpu" else "gpu"

    def expert_on_cpu(self, layer: int, tier: str, tokens: int) -> bool:
        """Whether a cold expert of ``tier`` with ``tokens`` tokens (expected over the group) runs on the CPU."""
        mode = self.host.experts
        if tier not in HOST_TIERS or mode == "off":
            return False
        if mode == "all":
            return True
        return self.expert_rule is not None and self.expert_rule.cpu_wins(layer, tokens)

    @property
    def layers(self) -> int:
        L = self.costs.num_layers
        return L if self.num_layers is None else min(self.num_layers, L)

    def is_moe(self, layer: int) -> bool:
        return self.costs.layers[layer].kind == "moe"

    def next_moe(self, layer: int) -> int | None:
        """The first MoE layer after ``layer`` (-1: the first of the model) inside the window."""
        return next((i for i in range(layer + 1, self.layers) if self.is_moe(i)), None)


@dataclass
class Builder:
    """The op list in issue order, and what later ops depend on."""

    ctx: StepContext
    ops: list[Op] = field(default_factory=list)
    last_compute: int | None = None
    layer_last_compute: list[int] = field(default_factory=list)
    dense_release: dict[int, int | None] = field(default_factory=dict)  # layer -> its dense buffer's release
    layer_free: dict[int, int | None] = field(default_factory=dict)  # layer -> its last release (or compute)
    last_gate: int | None = None  # the last gate built (the runtime issues nothing after it until it has run)
    kv_order: list[tuple[int, int]] = field(default_factory=list)  # (layer, batch) of every KV load, issue order
    kv_store_of: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, batch) -> its KV store
    kv_loaded: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, batch) -> kv_load op
    attn_back: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, batch) -> CPU attention output
    slot_loads: list[int] = field(default_factory=list)  # one entry per streaming slot taken, in reserve order
    slot_release: dict[int, int] = field(default_factory=dict)  # load op -> the release that gives it back

    def slot_free(self, count: int) -> tuple[int, ...]:
        """Deps of a load taking ``count`` more streaming slots: the pool grants slots in reserve order, so
        the i-th slot taken waits for the release of the one ``expert_slots`` earlier (when that release is
        already built; a later one the runtime's pool waits for, the simulator cannot)."""
        slots = self.ctx.expert_slots
        if not slots:
            return ()
        n = len(self.slot_loads)
        loads, release = self.slot_loads, self.slot_release
        out = (release.get(loads[i - slots]) for i in range(max(n, slots), n + count))
        return tuple(d for d in out if d is not None)

    def add(self, kind, stream, device, layer, deps=(), **kw) -> Op:
        """Append an op; ``deps`` (None entries: nothing to wait for) become sorted distinct ids."""
        if deps:
            if len(deps) == 1:  # the common case, without building a set (the planner adds millions of ops)
                d = deps[0]
                deps = () if d is None else (d,)
            else:
                deps = tuple(sorted({d for d in deps if d is not None}))
        op = Op(len(self.ops), kind, stream, device, layer, deps=deps, **kw)
        self.ops.append(op)
        if stream == "compute" and kind in _COMPUTE:  # host-side compute has lanes of its own
            self.last_compute = op.id
        return op


# ---- weight loads ------------------------------------------------------------------------------------------

def dense_bytes(ctx: StepContext, layer: int) -> dict[str, int]:
    """Stored bytes of ``layer``'s attention / gate / shared weights per tier they live on."""
    lc, p = ctx.costs.layers[layer], ctx.placement
    out = {"gpu": 0, "cpu": 0, "disk": 0}
    for cls in ("attn", "gate", "shared"):
        out[getattr(p, cls)] += getattr(lc, f"{cls}_bytes")
    return out


def _copy(b: Builder, layer: int, stream: str, tensor: str, host_bytes: int, disk_bytes: int, deps,
          expert: int | None = None, experts: tuple = ()):
    """A load of ``host_bytes`` + ``disk_bytes`` stored bytes: a read of the disk part (disk link, into the
    staging ring) then one copy of everything to the device, both on ``stream`` -> the copy op."""
    deps = tuple(deps)
    mem = {}  # it fills a buffer of the runtime's fixed pools (counted for the whole step)
    if disk_bytes:
        read = b.add("read", stream, "cpu", layer, tensor=tensor, expert=expert, experts=experts, link="disk",
                     bytes=disk_bytes, deps=deps, mem_alloc=mem)
        yield read
        deps, mem = (read.id,), {}
    op = b.add("h2d", stream, "gpu", layer, tensor=tensor, expert=expert, experts=experts, link="h2d",
               bytes=host_bytes + disk_bytes, deps=deps, mem_alloc=mem)
    yield op
    return op.id


def load_dense(b: Builder, layer: int, deps=()):
    """``layer``'s streamed dense weights into a dense buffer (one load, on the prefetch lane) -> load id.
    ``deps``: what frees its buffer (the pool's reuse)."""
    ctx = b.ctx
    by_tier = dense_bytes(ctx, layer)
    streamed = by_tier["cpu"] + by_tier["disk"]
    if not streamed:
        return None
    return (yield from _copy(b, layer, "prefetch", "dense", by_tier["cpu"], by_tier["disk"], deps))


def load_expert(b: Builder, layer: int, e: int, tier: str, stream: str, deps=()):
    """One routed expert (host or disk) into a streaming slot -> load id."""
    nbytes = b.ctx.costs.layers[layer].expert_bytes
    deps = (*deps, *b.slot_free(1))
    lid = yield from _copy(b, layer, stream, "expert", nbytes if tier == "cpu" else 0,
                           nbytes if tier == "disk" else 0, deps, expert=e)
    b.slot_loads.append(lid)
    return lid


def load_experts(b: Builder, layer: int, experts: tuple[int, ...], tier: str, deps=()):
    """Several routed experts of one tier into streaming slots, one load on the prefetch lane -> load id."""
    if not experts:
        return None
    nbytes = len(experts) * b.ctx.costs.layers[layer].expert_bytes
    deps = (*deps, *b.slot_free(len(experts)))
    lid = yield from _copy(b, layer, "prefetch", "experts", nbytes if tier == "cpu" else 0,
                           nbytes if tier == "disk" else 0, deps, experts=tuple(experts))
    b.slot_loads.extend([lid] * len(experts))
    return lid


def release(b: Builder, layer: int, tensor: str, load: int | None, nbytes: int, expert: int | None = None,
            experts: tuple = ()):
    """Give back the buffer / slot(s) ``load`` filled (nothing when nothing was loaded) -> release id."""
    if load is None:
        return None
    op = b.add("release", "compute", "gpu", layer, tensor=tensor, expert=expert, experts=experts, deps=(load,))
    if tensor in ("expert", "experts"):
        b.slot_release[load] = op.id
    yield op
    return op.id


def release_dense(b: Builder, layer: int, load: int | None):
    """Give back ``layer``'s dense buffer; closes the layer (its last compute and last release recorded)."""
    by_tier = dense_bytes(b.ctx, layer)
    rel = yield from release(b, layer, "dense", load, by_tier["cpu"] + by_tier["disk"])
    b.dense_release[layer] = rel
    b.layer_free[layer] = rel if rel is not None else b.layer_free.get(layer, b.last_compute)
    b.layer_last_compute.append(b.last_compute)


# ---- compute -------------------------------------------------------------------------------------------------

def staging_buffer_bytes(ctx: StepContext, layer: int) -> int:
    """Device bytes of one KV staging buffer: a micro-batch's KV of ``layer`` at the cache's capacity (the
    runtime sizes its buffers to the capacity, so one buffer serves every step of a generation)."""
    return ctx.shape.batch_size * ctx.shape.context_len * ctx.costs.layers[layer].kv_bytes_per_token


def kv_load(b: Builder, layer: int, batch: int):
    """Micro-batch ``batch``'s KV of ``layer`` into a device staging buffer (KV in host memory; once).

    The ``kv_buffers`` staging buffers are granted in load order (the runtime's pool): this load takes the
    buffer the store of the load ``kv_buffers`` before it frees (that store is always built by now). It also
    waits for the last gate built: the runtime reads each gate's routing on the host before it issues
    anything after it."""
    ctx = b.ctx
    if ctx.placement.kv != "cpu" or (layer, batch) in b.kv_loaded:
        return
    lc, shape = ctx.costs.layers[layer], ctx.shape
    j = len(b.kv_order)
    free = None
    if j >= ctx.kv_buffers:
        prev = b.kv_order[j - ctx.kv_buffers]
        free = b.kv_store_of.get(prev)
        if free is None:
            raise RuntimeError(f"KV load of layer {layer} batch {batch} needs the staging buffer of layer "
                               f"{prev[0]} batch {prev[1]}, whose store is not built yet: the op order would "
                               f"deadlock the runtime's {ctx.kv_buffers} buffers")
    op = b.add("kv_load", "kv_load", "gpu", layer, batch=batch, tensor="kv", link="h2d",
               bytes=shape.batch_size * shape.past_len * lc.kv_bytes_per_token, deps=(free, b.last_gate),
               mem_alloc={"gpu": staging_buffer_bytes(ctx, layer)})
    b.kv_order.append((layer, batch))
    b.kv_loaded[(layer, batch)] = op.id
    yield op


def next_layer_kv(b: Builder, layer: int):
    """Once ``layer``'s gates have run: the KV loads of every micro-batch of the next layer, when there is a
    staging buffer per micro-batch (they arrive while ``layer``'s experts run; with fewer, each waits for
    the next layer's own stores and is issued one micro-batch ahead by :func:`attention`)."""
    ctx = b.ctx
    if layer + 1 >= ctx.layers or ctx.attn_device != "gpu" or ctx.kv_buffers < ctx.shape.n:
        return
    for k in range(ctx.shape.n):
        yield from kv_load(b, layer + 1, k)


def attention(b: Builder, layer: int, batch: int, weights: int | None, prefetch_kv: bool = True):
    """[KV load], the attention of one micro-batch, [KV store]; with ``prefetch_kv`` the next micro-batch's
    KV load is issued before this attention so that it overlaps it. -> the attention op id."""
    ctx = b.ctx
    if ctx.attn_device == "cpu":
        return (yield from cpu_attention(b, layer, batch, weights, prefetch_kv))
    costs, shape, lc = ctx.costs, ctx.shape, ctx.costs.layers[layer]
    yield from kv_load(b, layer, batch)
    if prefetch_kv:
        nxt = (layer, batch + 1) if batch + 1 < shape.n else (layer + 1, 0)
        if nxt[0] < ctx.layers:
            yield from kv_load(b, *nxt)
    seqs = shape.batch_size
    proj, score, kv_read = costs.attn_flops(layer, seqs, shape.q_len, shape.past_len)
    attn = b.add("attn", "compute", "gpu", layer, batch=batch, tensor="attn",
                 deps=(b.kv_loaded.get((layer, batch)), weights), tokens=seqs * shape.q_len, flops=proj,
                 score_flops=score, bytes=lc.attn_bytes + kv_read)
    yield attn
    if ctx.placement.kv == "cpu":
        store = b.add("kv_store", "kv_store", "cpu", layer, batch=batch, tensor="kv", link="d2h",
                      bytes=seqs * shape.q_len * lc.kv_bytes_per_token, deps=(attn.id,),
                      mem_free={"gpu": staging_buffer_bytes(ctx, layer)})
        b.kv_store_of[(layer, batch)] = store.id
        yield store
    return attn.id


def _cpu_attention_issue(b: Builder, layer: int, batch: int, weights: int | None):
    """Q/K/V of micro-batch ``batch`` on the device, then on the ``cpu_attn`` lane: Q/K/V to the host, attention
    over the host KV cache (appending the step's columns there), the output back (once per micro-batch)."""
    ctx = b.ctx
    if (layer, batch) in b.attn_back:
        return
    costs, shape, lc = ctx.costs, ctx.shape, ctx.costs.layers[layer]
    seqs, tokens = shape.batch_size, shape.batch_size * shape.q_len
    proj, score, kv_read = costs.attn_flops(layer, seqs, shape.q_len, shape.past_len)
    out_flops, out_bytes, up, down = costs.attn_host_split(layer, tokens)
    qkv = b.add("attn_qkv", "compute", "gpu", layer, batch=batch, tensor="attn", deps=(weights,), tokens=tokens,
                flops=max(0.0, proj - out_flops), bytes=lc.attn_bytes - out_bytes)
    yield qkv
    send = b.add("act_d2h", "cpu_attn", "cpu", layer, batch=batch, tensor="qkv", link="d2h", bytes=up,
                 deps=(qkv.id,))
    yield send
    core = b.add("attn_core", "cpu_attn", "cpu", layer, batch=batch, tensor="attn", tokens=tokens,
                 score_flops=score, bytes=kv_read, deps=(send.id,))
    yield core
    back = b.add("act_h2d", "cpu_attn", "gpu", layer, batch=batch, tensor="attn_out", link="h2d", bytes=down,
                 deps=(core.id,))
    yield back
    b.attn_back[(layer, batch)] = back.id


def cpu_attention(b: Builder, layer: int, batch: int, weights: int | None, prefetch_kv: bool = True):
    """Attention of one micro-batch with its scores on the CPU over the host KV cache (no KV load or store).
    With ``prefetch_kv`` the next micro-batch's Q/K/V and CPU attention are issued before this one's output
    projection, so the CPU works on it while the device finishes this one. -> the output projection's id."""
    ctx = b.ctx
    yield from _cpu_attention_issue(b, layer, batch, weights)
    if prefetch_kv and batch + 1 < ctx.shape.n:
        yield from _cpu_attention_issue(b, layer, batch + 1, weights)
    tokens = ctx.shape.tokens_per_batch
    out_flops, out_bytes, _, _ = ctx.costs.attn_host_split(layer, tokens)
    out = b.add("attn_out", "compute", "gpu", layer, batch=batch, tensor="attn", tokens=tokens, flops=out_flops,
                bytes=out_bytes, deps=(b.attn_back.pop((layer, batch)), weights))
    yield out
    return out.id


def on_host(b: Builder, view, layer: int, batch: int | None, e: int, tier: str) -> bool:
    """Whether cold expert ``e`` (of ``tier``: host memory, or disk and then read into host memory) of ``layer``
    runs on the CPU instead of being copied to the device: the plan's mode, and under "auto" the rule on the
    tokens ``view`` expects it to get (asked only then)."""
    mode = b.ctx.host.experts
    if tier not in HOST_TIERS or mode == "off":
        return False
    if mode == "all":
        return True
    return b.ctx.expert_on_cpu(layer, tier, view.expected(layer, batch, e))


def cpu_experts(b: Builder, view, layer: int, batch: int | None, experts: tuple[int, ...], tokens: int, deps=()):
    """Routed ``experts`` computed on the CPU over micro-batch ``batch`` (None: the whole group), on the
    ``cpu_experts`` lane: each disk-tier one read into host memory (a ``read`` on the disk link, held until the
    call ends), the hidden rows to the host, one call over the experts with their weights in host memory, the
    fp32 outputs back. -> the id of the copy back (None when no expert)."""
    if not experts:
        return None
    ctx = b.ctx
    lc, costs = ctx.costs.layers[layer], ctx.costs
    reads = []
    for e in experts:
        if view.tier(layer, e) == "disk":
            read = b.add("read", "cpu_experts", "cpu", layer, batch=batch, tensor="expert", expert=e, link="disk",
                         bytes=lc.expert_bytes, deps=deps, mem_alloc={"cpu": lc.expert_bytes})
            yield read
            reads.append(read.id)
    send = b.add("act_d2h", "cpu_experts", "cpu", layer, batch=batch, tensor="hidden", link="d2h",
                 bytes=costs.hidden_bytes(tokens), deps=deps)
    yield send
    op = b.add("experts", "cpu_experts", "cpu", layer, batch=batch, tensor="expert", experts=tuple(experts),
               tokens=tokens, calls=len(experts), flops=costs.expert_flops(layer, tokens),
               bytes=len(experts) * lc.expert_bytes, deps=(send.id, *reads),
               mem_free={"cpu": len(reads) * lc.expert_bytes} if reads else {})
    yield op
    back = b.add("act_h2d", "cpu_experts", "gpu", layer, batch=batch, tensor="expert_out", link="h2d",
                 bytes=tokens * costs.spec.hidden_size * 4, deps=(op.id,))
    yield back
    return back.id


def gate(b: Builder, layer: int, batch: int, weights: int | None):
    """The router of micro-batch ``batch`` (its routing is in the view once this op has run). It reads the
    router's weights and the micro-batch's hidden rows (more bytes than the weights from a few tokens up)."""
    ctx = b.ctx
    lc, tokens = ctx.costs.layers[layer], ctx.shape.tokens_per_batch
    op = b.add("gate", "compute", "gpu", layer, batch=batch, tensor="gate", deps=(weights,), tokens=tokens,
               flops=ctx.costs.gate_flops(layer, tokens), bytes=lc.gate_bytes + ctx.costs.hidden_bytes(tokens))
    b.last_gate = op.id
    yield op
    return op.id


def finish_mlp(b: Builder, layer: int, batch: int | None, weights: int | None, deps=()):
    """The shared expert (or a dense layer's MLP) and the residual add of the routed output, over micro-batch
    ``batch`` (None: the whole group). Bytes: the shared / MLP weights and the residual stream it updates
    (:meth:`~klotski.costs.ModelCosts.residual_bytes`: without a shared expert, all this op moves)."""
    ctx = b.ctx
    lc = ctx.costs.layers[layer]
    tokens = ctx.shape.tokens_per_batch * (ctx.shape.n if batch is None else 1)
    op = b.add("shared", "compute", "gpu", layer, batch=batch, tensor="shared", deps=(weights, *deps),
               tokens=tokens, flops=ctx.costs.shared_flops(layer, tokens),
               bytes=lc.shared_bytes + ctx.costs.residual_bytes(layer, tokens))
    yield op
    return op.id


def lm_head(b: Builder):
    ctx = b.ctx
    seqs = ctx.shape.batch_size * ctx.shape.n
    ws = int(seqs * ctx.costs.spec.vocab_size * 4)
    op = b.add("lm_head", "compute", "gpu", ctx.layers, tensor="lm_head", tokens=seqs,
               flops=ctx.costs.lm_head_flops(seqs), bytes=ctx.costs.lm_head_bytes, mem_alloc={"gpu": ws},
               mem_free={"gpu": ws})
    yield op
