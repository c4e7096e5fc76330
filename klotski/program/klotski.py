"""The Klotski paper's expert-aware multi-batch order.

Per MoE layer: its dense weights were issued at the start of the previous layer (two dense buffers) and its
hot experts -- the prefetcher's prediction -- after the previous MoE layer's gates, both on the prefetch
lane. Attention and gate run micro-batch by micro-batch (over a KV cache in host memory, each micro-batch's
KV loads into a staging buffer of its own: once a layer's gates have run, the next layer's KV loads go out and
arrive while this layer's experts run); each gate issues, on the expert_io lane, the loads
of the experts it selected that are neither GPU-resident, hot nor already loading (cold). Once the gates have
run, the next MoE layer's hot experts are issued (predicted from this layer's routing). Then the experts run
expert by expert over the tokens of all n micro-batches: the GPU-resident and hot ones in one grouped call,
the cold ones in the order they were issued, each slot released right after use; unused hot experts are
released first. The shared expert and the residual add close the layer. A cold expert the plan computes on the
host (:mod:`klotski.program.host`) is not loaded: after the gates, the host-side experts run in one call on
the ``cpu_experts`` lane while the device computes the others.

With ``overlap`` (the planner's "wide, early" variant) the next MoE layer's hot experts are issued with its
dense weights at the start of this layer, predicted from popularity alone (the routing that would refine
them is not known yet), at most every streaming slot but one, so that this layer's cold experts always
find a slot.
"""
from __future__ import annotations

from klotski.program.context import (Builder, attention, cpu_experts, finish_mlp, gate, load_dense, load_expert,
                                     next_layer_kv, on_host, release, release_dense)
from klotski.program.routing import RoutingView


def hot_budget(b: Builder) -> int:
    """Experts prefetched per MoE layer: the plan's prefetch width within the streaming slots."""
    ctx = b.ctx
    if ctx.expert_slots is None:
        return ctx.num_hot
    return max(0, min(ctx.num_hot, ctx.expert_slots - (1 if ctx.overlap else 0)))


def klotski_ops(b: Builder, view: RoutingView):
    ctx = b.ctx
    budget = hot_budget(b)
    dense: dict[int, int | None] = {}
    hot: dict[int, list[tuple[int, int]]] = {}
    issued_hot: set[int] = set()

    def issue_dense(layer: int):
        if layer < ctx.layers and layer not in dense:
            dense[layer] = yield from load_dense(b, layer, deps=(b.dense_release.get(layer - ctx.dense_buffers),))

    def issue_hot(layer: int | None, source: int | None, deps=()):
        if layer is None or layer in issued_hot:
            return
        issued_hot.add(layer)
        hot[layer] = []
        for e in view.hot(layer, source, budget):
            lid = yield from load_expert(b, layer, e, view.tier(layer, e), "prefetch", deps)
            hot[layer].append((e, lid))

    yield from issue_dense(0)
    yield from issue_hot(ctx.next_moe(-1), -1)
    for layer in range(ctx.layers):
        if layer + 1 < ctx.layers:
            yield from issue_dense(layer + 1)
            if ctx.overlap and ctx.next_moe(layer) == layer + 1:  # issued once the previous layer is done
                yield from issue_hot(layer + 1, None, deps=(b.last_compute,))
        w = dense.pop(layer)
        if ctx.is_moe(layer):
            yield from _moe_layer(b, view, layer, w, hot.pop(layer, []), issue_hot)
        else:
            for k in range(ctx.shape.n):
                yield from attention(b, layer, k, w)
            yield from next_layer_kv(b, layer)
            yield from finish_mlp(b, layer, None, w)
            yield from issue_hot(ctx.next_moe(layer), layer, deps=(b.last_compute,))
        yield from release_dense(b, layer, w)


def _moe_layer(b: Builder, view: RoutingView, layer: int, w, mine: list[tuple[int, int]], issue_hot):
    ctx = b.ctx
    lc = ctx.costs.layers[layer]
    pending = {e for e, _ in mine}
    cold: list[tuple[int, int]] = []
    host: list[int] = []  # cold experts computed on the CPU (host or disk tier, cheaper there: no copy to the device)
    for k in range(ctx.shape.n):
        yield from attention(b, layer, k, w)
        g = yield from gate(b, layer, k, w)
        for e in view.selected(layer, k):
            if e in pending:
                continue
            tier = view.tier(layer, e)
            if tier == "gpu":
                continue
            pending.add(e)
            if on_host(b, view, layer, k, e, tier):
                host.append(e)
                continue
            cold.append((e, (yield from load_expert(b, layer, e, tier, "expert_io", deps=(g,)))))
    yield from next_layer_kv(b, layer)
    yield from issue_hot(ctx.next_moe(layer), layer, deps=(b.last_compute,))
    used = view.tokens(layer, None)
    back = yield from cpu_experts(b, view, layer, None, tuple(host), sum(used.get(e, 0) for e in host), deps=(g,))
    for e, lid in mine:  # prefetched but not selected: give the slot back at once
        if e not in used:
            yield from release(b, layer, "expert", lid, lc.expert_bytes, expert=e)
    first = [e for e in sorted(used) if view.tier(layer, e) == "gpu"] + [e for e, _ in mine if e in used]
    if first:
        tokens = sum(used[e] for e in first)
        yield b.add("experts", "compute", "gpu", layer, tensor="expert", experts=tuple(first),
                    deps=tuple(lid for e, lid in mine if e in used), tokens=tokens, calls=len(first),
                    flops=ctx.costs.expert_flops(layer, tokens), bytes=len(first) * lc.expert_bytes)
        for e, lid in mine:
            if e in used:
                yield from release(b, layer, "expert", lid, lc.expert_bytes, expert=e)
    for e, lid in cold:  # in the order their loads were issued
        yield b.add("expert", "compute", "gpu", layer, expert=e, tensor="expert", deps=(lid,), tokens=used[e],
                    flops=ctx.costs.expert_flops(layer, used[e]), bytes=lc.expert_bytes)
        yield from release(b, layer, "expert", lid, lc.expert_bytes, expert=e)
    yield from finish_mlp(b, layer, None, w, deps=(back,))
