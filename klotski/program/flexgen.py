"""FlexGen's zig-zag order: the n micro-batches of a group share each layer's load.

Per layer: the layer's streamed dense weights and every expert that is not GPU-resident load on the prefetch
lane (host-resident experts in one load, disk-resident ones in another: a read then a copy); with
``overlap`` the next layer's loads are issued at the start of this one (two layers in flight: each waits
for the layer two back to give its buffers back) and a KV cache in host memory loads one micro-batch ahead;
without it everything loads just in time (with n = 1 that is the layerwise order).
Attention runs micro-batch by micro-batch, then per micro-batch the gate, one grouped call over the experts
it selected and the residual add; the layer's slots and buffer are released at its end.

``layerwise`` (Accelerate-like) is the same order for one micro-batch at a time, every layer loaded just in
time and nothing overlapped: :func:`layerwise_ops`.
"""
from __future__ import annotations

from klotski.program.context import (Builder, attention, cpu_experts, finish_mlp, gate, load_dense, load_experts,
                                     on_host, release, release_dense)
from klotski.program.routing import RoutingView


def _loads(b: Builder, view: RoutingView, layer: int, free):
    """Issue ``layer``'s loads (after ``free``) -> (dense load, [(experts, load)] per tier, experts computed on
    the host). Experts the plan computes on the CPU (judged from the tokens expected before any gate; host-tier
    ones in place, disk-tier ones after their read on the CPU lane) are not loaded."""
    ctx = b.ctx
    dense = yield from load_dense(b, layer, deps=(free,))
    groups, host = [], ()
    if ctx.is_moe(layer):
        E = ctx.costs.layers[layer].num_experts
        host = tuple(e for e in range(E) if on_host(b, view, layer, None, e, view.tier(layer, e)))
        for tier in ("cpu", "disk"):
            es = tuple(e for e in range(E) if view.tier(layer, e) == tier and e not in host)
            lid = yield from load_experts(b, layer, es, tier, deps=(free,))
            if lid is not None:
                groups.append((es, lid))
    return dense, groups, host


def _compute(b: Builder, view: RoutingView, layer: int, batches, dense, groups, host, prefetch_kv: bool):
    """Attention of every micro-batch in ``batches``, then per micro-batch gate, experts (the ``host`` ones on
    the CPU lane beside the device call), residual add; the experts' slots are released after the last
    micro-batch's expert call."""
    ctx = b.ctx
    lc = ctx.costs.layers[layer]
    for k in batches:
        yield from attention(b, layer, k, dense, prefetch_kv=prefetch_kv)
    loads = tuple(lid for _, lid in groups)
    for i, k in enumerate(batches):
        if not ctx.is_moe(layer):
            yield from finish_mlp(b, layer, k, dense)
            continue
        g = yield from gate(b, layer, k, dense)
        used = view.tokens(layer, k)
        on_cpu = tuple(e for e in host if e in used)
        back = yield from cpu_experts(b, view, layer, k, on_cpu, sum(used[e] for e in on_cpu), deps=(g,))
        if on_cpu:
            used = {e: t for e, t in used.items() if e not in on_cpu}
        tokens = sum(used.values())
        op = b.add("experts", "compute", "gpu", layer, batch=k, tensor="expert", deps=(g, *loads), tokens=tokens,
                   calls=max(1, len(used)), flops=ctx.costs.expert_flops(layer, tokens),
                   bytes=len(used) * lc.expert_bytes)
        yield op
        if i == len(batches) - 1:
            for es, lid in groups:
                b.layer_free[layer] = yield from release(b, layer, "experts", lid, len(es) * lc.expert_bytes,
                                                         experts=es)
        yield from finish_mlp(b, layer, k, dense, deps=(op.id, back))


def flexgen_ops(b: Builder, view: RoutingView):
    ctx = b.ctx
    reuse = 2 if ctx.overlap else 1  # layers in flight: a layer's loads wait for the layer `reuse` back
    issued: dict[int, tuple] = {}

    def issue(layer: int):
        if layer < ctx.layers and layer not in issued:
            issued[layer] = yield from _loads(b, view, layer, b.layer_free.get(layer - reuse))

    for layer in range(ctx.layers):
        yield from issue(layer)
        if ctx.overlap:
            yield from issue(layer + 1)  # the next layer loads while this one computes
        dense, groups, host = issued.pop(layer)
        yield from _compute(b, view, layer, range(ctx.shape.n), dense, groups, host, prefetch_kv=ctx.overlap)
        yield from release_dense(b, layer, dense)


def layerwise_ops(b: Builder, view: RoutingView):
    """Each micro-batch through the whole model on its own; each layer loaded just before it computes."""
    ctx = b.ctx
    for k in range(ctx.shape.n):
        for layer in range(ctx.layers):
            prev = b.layer_free.get(layer - 1) if layer else b.layer_free.get(ctx.layers - 1)
            dense, groups, host = yield from _loads(b, view, layer, prev)
            yield from _compute(b, view, layer, [k], dense, groups, host, prefetch_kv=False)
            yield from release_dense(b, layer, dense)
