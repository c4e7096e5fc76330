"""The runtime's side of the single schedule: execute the ops the plan's op builder emits, in order.

:class:`StepInterpreter` builds one step's :class:`~klotski.program.StepContext` from the executor's plan and
layout (placement as placed, pool sizes, prefetch width, overlap, the KV cache's actual tier) and pulls the
ops of :func:`klotski.program.step_ops` one at a time:

* loads (``read`` + ``h2d`` of a dense buffer, an expert, a group of experts; ``kv_load``) are submitted to
  the lane named by the op's stream (a disk read and its copy run as one job on that lane), slots reserved
  in op order;
* compute ops (``attn``, ``gate``, ``experts`` / ``expert``, ``shared``, ``lm_head``) run on the compute
  stream, each first waiting for the loads it depends on; ``kv_store`` is submitted after its attention;
* ``release`` gives the buffer or slot back (with an event the next writer waits on);
* host compute (:mod:`klotski.program.host`): ``attn_qkv`` / ``attn_out`` run on the compute stream, the
  ``act_d2h`` / ``attn_core`` / ``act_h2d`` of CPU attention and the [``read`` of each disk-tier expert] /
  ``act_d2h`` / ``experts`` (device "cpu") / ``act_h2d`` of CPU experts run as one job on their lane
  (``cpu_attn`` / ``cpu_experts``), submitted at the copy back; the device waits for its result right before
  the output projection / the layer's MLP finish.

The routing reaches the builder through :class:`LiveRouting`: when the builder resumes after a gate, that
gate has run and its ``topk_ids`` are in the view. Consecutive cold ``expert`` ops whose loads have already
arrived run as one grouped kernel call (the same ops, in the same order, one launch).

With ``record=True`` every step's ops, the routing answers the builder got and the op ids each lane executed
are kept (:attr:`StepInterpreter.steps`), so a test can rebuild the ops from the recorded routing
(:class:`klotski.program.ReplayView`) and compare them with what ran.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from klotski.program import Builder, RecordingView, StepContext, order_of, step_ops
from klotski.schedule import Op, StepShape


class LiveRouting:
    """The builder's routing view during a run: tiers as placed, hot sets from the executor's prefetcher or
    lookahead predictor, selections from the gates that just ran."""

    def __init__(self, ex):
        self.ex = ex
        self.E = ex.spec.num_experts
        self.gates: dict[tuple[int, int], torch.Tensor] = {}  # (layer, batch) -> topk_ids in host memory
        self.last_topk: torch.Tensor | None = None  # the last routed MoE layer's topk_ids (the group's)
        self.resid: dict[int, torch.Tensor] = {}  # layer -> rows entering its MLP (gate lookahead input)
        self.predicted: dict[int, list[int]] = {}
        self.last_source: int | None = -1
        self.group_tokens = 0  # valid tokens of the step (set per step): the expectation before any gate
        self.n = 1  # micro-batches of the step

    def tier(self, layer: int, e: int) -> str:
        t = self.ex.w.expert_tier(layer, e)
        return "disk" if t == "store" else t

    def hot(self, layer: int, source: int | None, budget: int) -> list[int]:
        ex = self.ex
        prev = self.last_topk if source is not None and source >= 0 else None
        hidden = self.resid.pop(source, None) if source is not None else None  # used once
        src = layer - 1 if source is None else source  # early: predicted while layer - 1 starts
        if ex.predictor is not None:
            resident = [e for e in range(self.E) if self.tier(layer, e) == "gpu"]
            streamed = list(ex.predictor.predict_next(src, hidden, prev, budget, exclude=resident))
        else:
            pred = ex.prefetcher.predict(layer, prev, budget + self.E) if ex.prefetcher is not None else range(self.E)
            streamed = [int(e) for e in pred if self.tier(layer, int(e)) != "gpu"][:budget]
        self.predicted[layer] = streamed
        return streamed

    def _counts(self, layer: int, batch: int | None) -> torch.Tensor:
        if batch is None:
            ids = torch.cat([t for (lay, _), t in sorted(self.gates.items()) if lay == layer])
        else:
            ids = self.gates[(layer, batch)]
        return torch.bincount(ids.reshape(-1).long(), minlength=self.E)

    def selected(self, layer: int, batch: int) -> list[int]:
        counts = self._counts(layer, batch)
        used = torch.nonzero(counts).flatten().tolist()
        return sorted(used, key=lambda e: (-int(counts[e]), e))

    def tokens(self, layer: int, batch: int | None) -> dict[int, int]:
        counts = self._counts(layer, batch)
        return {int(e): int(counts[e]) for e in torch.nonzero(counts).flatten().tolist()}

    def expected(self, layer: int, batch: int | None, e: int) -> int:
        """Tokens expert ``e`` is expected to get over the group: before any gate, a uniform share of the
        group's token-expert pairs; after micro-batch ``batch``'s gate, what the gates so far gave it,
        projected over the group's ``n`` micro-batches (the later ones routing like these)."""
        if batch is None:
            return -(-self.group_tokens * max(self.ex.spec.top_k, 1) // max(self.E, 1))
        seen = sum(int((self.gates[(layer, k)] == e).sum()) for k in range(batch + 1) if (layer, k) in self.gates)
        return -(-seen * self.n // (batch + 1))


class StepInterpreter:
    """Runs the executor's plan: one :meth:`run` per forward (one step of a batch group)."""

    def __init__(self, ex, record: bool = False):
        self.ex = ex
        plan = ex.plan
        self.policy = order_of(plan.policy, plan.num_hot) if plan is not None else ex.policy
        self.overlap = plan.overlap if plan is not None else self.policy != "klotski"
        self.record = record
        self.steps: list[dict] = []  # with record: {"ops", "routing", "lanes"} per step

    def context(self, st) -> StepContext:
        ex, cache = self.ex, st.cache
        n = cache.num_batches
        # the step's phase as the executor judged it: a prefill's one-column chunk and a one-token prompt's first
        # forward run the prefill program (its attention placement and prefetch width), as the planner prices a prefill
        shape = StepShape("decode" if st.decode else "prefill", -(-cache.batch_size // n), n, st.S, cache.length,
                          cache.capacity)
        pool = ex.w.pool
        return StepContext(ex.costs, replace(ex.layout.placement, kv=cache.tier), shape, ex.num_hot, self.overlap,
                           dense_buffers=ex.layout.dense_buffers,
                           expert_slots=pool.streaming_slots if pool is not None else 0,
                           kv_buffers=ex.kv.pool.capacity, host=ex.host,
                           expert_rule=ex.expert_rule)

    def run(self, st) -> None:
        ex = self.ex
        view = LiveRouting(ex)
        builder = Builder(self.context(st))
        view.group_tokens, view.n = int(st.valid.sum()), builder.ctx.shape.n
        routing = RecordingView(view) if self.record else view
        ex.tracer.bind_ops(builder.ops)  # spans carry the cost of the ops they run
        if self.record:
            ex.tracer.op_log = []
        step = _Step(ex, st, view, builder.ctx, per_batch_routing=self.policy == "layerwise")
        for op in step_ops(self.policy, builder, routing):
            step.execute(op)
        step.flush()
        for t in st.kv_stores:  # the step's appended KV columns have landed in host memory
            t.wait()
        if self.record:
            self.steps.append({"ops": builder.ops, "routing": routing.log, "lanes": ex.tracer.op_log,
                               "context": builder.ctx})
            ex.tracer.op_log = None


class _Step:
    """The state one step's ops share: tickets of issued loads, weights in use, gate outputs, accumulators."""

    def __init__(self, ex, st, view: LiveRouting, ctx: StepContext, per_batch_routing: bool):
        self.ex, self.st, self.view, self.ctx = ex, st, view, ctx
        self.per_batch_routing = per_batch_routing  # layerwise: one micro-batch's routing is the layer's
        self.tickets: dict[int, object] = {}  # load op id -> Ticket
        self.done: dict[int, object] = {}  # load op id -> its result, once waited
        self.reads: dict[int, Op] = {}  # a disk read waiting for its copy op
        self.dense: dict[int, int] = {}  # layer -> its dense load op
        self.expert_load: dict[tuple[int, int], int] = {}  # (layer, expert) -> its load op
        self.weights: dict[int, dict] = {}
        self.kv: dict[tuple[int, int], int] = {}  # (layer, batch) -> kv_load op
        self.kv_used: dict[tuple[int, int], tuple] = {}  # (layer, batch) -> (staging buffer, view)
        self.routed: dict[tuple[int, int | None], tuple] = {}  # (layer, batch) -> (rows, h, topk_w, ids, ids_host)
        self.out: dict[tuple[int, int | None], torch.Tensor] = {}  # routed experts' fp32 accumulators
        self.cold: list[Op] = []  # cold expert ops waiting to run as one call
        self.deferred: list[Op] = []  # releases of their slots
        self.host_ops: list[Op] = []  # host-lane ops issued as one job at their copy back (act_h2d)
        self.qkv: dict[tuple[int, int], tuple] = {}  # (layer, batch) -> (Q/K/V parts, ready event)
        self.attn_back: dict[tuple[int, int], object] = {}  # (layer, batch) -> Ticket of the CPU attention
        self.host_out: dict[tuple[int, int | None], object] = {}  # (layer, batch) -> Ticket of CPU experts

    # ---- helpers -----------------------------------------------------------------------------------------
    def result(self, load_id: int):
        if load_id not in self.done:
            self.done[load_id] = self.tickets[load_id].wait()
        return self.done[load_id]

    def layer_weights(self, layer: int) -> dict:
        if layer not in self.weights:
            lid = self.dense.get(layer)
            self.weights[layer] = self.result(lid)[1] if lid is not None else self.ex.w.resident[layer]
        return self.weights[layer]

    def slot(self, layer: int, e: int, load_id: int | None) -> int:
        if load_id is None:  # GPU-resident: its permanent slot
            tier, slot = self.ex.w.expert_home[(layer, e)]
            if tier != "gpu":
                raise RuntimeError(f"op builder and placed weights disagree: layer {layer} expert {e} is on "
                                   f"{tier} but no load was issued for it")
            return slot
        got = self.result(load_id)
        return got[e] if isinstance(got, dict) else got

    def group(self, layer: int, batch: int | None):
        """(rows, h, topk_w, topk_ids, ids_host) of micro-batch ``batch`` or, None, of the whole group."""
        key = (layer, batch)
        if key not in self.routed:
            parts = [self.routed[(layer, k)] for k in range(self.ctx.shape.n) if (layer, k) in self.routed]
            self.routed[key] = tuple(torch.cat([p[i] for p in parts]) for i in range(5))
        return self.routed[key]

    def accumulator(self, layer: int, batch: int | None) -> torch.Tensor:
        key = (layer, batch)
        if key not in self.out:
            h = self.group(layer, batch)[1]
            self.out[key] = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        return self.out[key]

    # ---- execution ---------------------------------------------------------------------------------------
    def execute(self, op: Op) -> None:
        if self.cold and not self._joins_cold(op):
            self.flush()
        getattr(self, f"_{op.kind}")(op)

    def _joins_cold(self, op: Op) -> bool:
        if op.kind == "release" and op.tensor == "expert":
            return any(c.expert == op.expert and c.layer == op.layer for c in self.cold)
        return op.kind == "expert" and op.layer == self.cold[0].layer and self.tickets[op.deps[0]].done()

    def flush(self) -> None:
        """Run the pending cold experts in one grouped call, then release their slots."""
        if not self.cold:
            return
        cold, self.cold = self.cold, []
        layer = cold[0].layer
        slots = {op.expert: self.slot(layer, op.expert, op.deps[0]) for op in cold}
        self.ex.tracer.log_ops("compute", [op.id for op in cold])
        rows, h, topk_w, topk_ids, ids_host = self.group(layer, None)
        self.ex.compute.experts(h, topk_w, topk_ids, slots, self.accumulator(layer, None), layer,
                                f"cold x{len(slots)}", ids_host)
        deferred, self.deferred = self.deferred, []
        for op in deferred:
            self._release(op)

    def _read(self, op: Op) -> None:
        if op.stream == "cpu_experts":  # a disk-tier expert the CPU computes: read in that lane's job
            self.host_ops.append(op)
            return
        self.reads[op.id] = op  # runs with the copy that follows it on the same lane

    def _h2d(self, op: Op) -> None:
        ex = self.ex
        ids = tuple(d for d in op.deps if d in self.reads) + (op.id,)
        for d in ids[:-1]:
            self.reads.pop(d)
        if op.tensor == "dense":
            if not ex.w.streamed_keys(op.layer):
                raise RuntimeError(f"op builder and placed weights disagree: layer {op.layer} streams no dense "
                                   f"weights, but the plan's placement ({ex.layout.placement}) loads some")
            ticket = ex.loads.dense(op.layer, op.stream, ids)
            self.dense[op.layer] = op.id
        elif op.tensor == "expert":
            ticket = ex.loads.expert(op.layer, op.expert, op.stream, ids)
            self.expert_load[(op.layer, op.expert)] = op.id
        elif op.tensor == "experts":
            ticket = ex.loads.experts(op.layer, op.experts, op.stream, ids)
        else:
            raise ValueError(f"op {op.id}: unknown load of {op.tensor!r}")
        for i in ids:
            self.tickets[i] = ticket

    def _kv_load(self, op: Op) -> None:
        self.tickets[op.id] = self.ex.kv.load(self.st, op.layer, op.batch, (op.id,))
        self.kv[(op.layer, op.batch)] = op.id

    def _kv_store(self, op: Op) -> None:
        idx, view = self.kv_used.pop((op.layer, op.batch))
        self.st.kv_stores.append(self.ex.kv.store(self.st, op.layer, op.batch, idx, view, (op.id,)))

    def _attn(self, op: Op) -> None:
        w = self.layer_weights(op.layer)
        key = (op.layer, op.batch)
        if key in self.kv:
            idx, kv = self.result(self.kv.pop(key))
            self.kv_used[key] = (idx, kv)
        else:
            kv = self.st.cache.micro[op.batch]
        self.ex.tracer.log_ops("compute", [op.id])
        self.ex.compute.attention(self.st, w, op.layer, op.batch, kv)

    def _gate(self, op: Op) -> None:
        ex, st, layer, k = self.ex, self.st, op.layer, op.batch
        w = self.layer_weights(layer)
        ex.tracer.log_ops("compute", [op.id])
        start = ex.tracer.begin()  # the gate's span holds its input: the gather and RMSNorm of the MLP's rows
        rows, h = ex.compute.tokens(st, w, k)
        # in flight for this layer: its prefetched hot experts and the cold loads earlier gates issued
        inflight = {e for (lay, e) in self.expert_load if lay == layer}
        topk_w, topk_ids = ex.compute.gate(w, h, layer, k, inflight=sorted(inflight), start=start)
        ids_host = topk_ids.cpu()  # the host decides which experts to load
        self.routed[(layer, k)] = (rows, h, topk_w, topk_ids, ids_host)
        self.view.gates[(layer, k)] = ids_host
        if self.per_batch_routing or k == self.ctx.shape.n - 1:  # the layer's routing is complete
            group = (rows, topk_ids) if self.per_batch_routing else tuple(self.group(layer, None)[i] for i in (0, 3))
            ex.record_routing(layer, group[1], self.view.predicted.pop(layer, None))
            self.view.last_topk = group[1]
            if ex.predictor is not None:  # the residual stream entering this MLP: the next router's lookahead
                self.view.resid[layer] = st.x.reshape(-1, ex.spec.hidden_size).index_select(0, group[0])

    # ---- host compute: its ops run as one job on their lane at the copy back ---------------------------------
    def _act_d2h(self, op: Op) -> None:
        self.host_ops.append(op)

    def _attn_core(self, op: Op) -> None:
        self.host_ops.append(op)

    def _act_h2d(self, op: Op) -> None:
        ex, st = self.ex, self.st
        ops, self.host_ops = self.host_ops + [op], []
        ids = tuple(o.id for o in ops)
        key = (op.layer, op.batch)
        if op.tensor == "attn_out":
            parts, ready = self.qkv.pop(key)
            self.attn_back[key] = ex.compute.attention_on_host(st, op.layer, op.batch, parts, ready, ex.lanes, ids)
        elif op.tensor == "expert_out":
            call = next(o for o in ops if o.kind == "experts")
            rows, h, topk_w, topk_ids, ids_host = self.group(op.layer, op.batch)
            self.host_out[key] = ex.compute.experts_on_host(h, topk_w, ids_host, call.experts, op.layer, ex.lanes,
                                                            ids)
        else:
            raise ValueError(f"op {op.id}: unknown copy back of {op.tensor!r}")

    def _attn_qkv(self, op: Op) -> None:
        w = self.layer_weights(op.layer)
        self.ex.tracer.log_ops("compute", [op.id])
        self.qkv[(op.layer, op.batch)] = self.ex.compute.attention_qkv(self.st, w, op.layer, op.batch)

    def _attn_out(self, op: Op) -> None:
        w = self.layer_weights(op.layer)
        out = self.attn_back.pop((op.layer, op.batch)).wait()
        self.ex.tracer.log_ops("compute", [op.id])
        self.ex.compute.attention_out(self.st, w, op.layer, op.batch, out)

    def _experts(self, op: Op) -> None:
        if op.device == "cpu":  # host-resident experts on the CPU lane: issued with their copy back
            self.host_ops.append(op)
            return
        layer, k = op.layer, op.batch
        if k is None:  # klotski: resident and hot experts over the whole group
            slots = {e: self.slot(layer, e, self.expert_load.get((layer, e))) for e in op.experts}
            name = "hot experts"
        else:  # flexgen / layerwise: every expert of the layer is in a slot; this micro-batch's tokens
            slots = self._layer_slots(op)
            name = f"experts b{k}"
        rows, h, topk_w, topk_ids, ids_host = self.group(layer, k)
        self.ex.tracer.log_ops("compute", [op.id])
        self.ex.compute.experts(h, topk_w, topk_ids, slots, self.accumulator(layer, k), layer, name, ids_host)

    def _layer_slots(self, op: Op) -> dict[int, int]:
        slots = {}
        for d in op.deps:
            if d in self.tickets and isinstance(self.result(d), dict):
                slots.update(self.result(d))
        for e in range(self.ex.spec.num_experts):
            if e not in slots and self.ex.w.expert_tier(op.layer, e) == "gpu":
                slots[e] = self.ex.w.expert_home[(op.layer, e)][1]
        return slots

    def _expert(self, op: Op) -> None:
        self.cold.append(op)  # runs at the next flush, grouped with the cold experts that have arrived

    def _shared(self, op: Op) -> None:
        ex, st, layer = self.ex, self.st, op.layer
        w = self.layer_weights(layer)
        start = None
        if ex.spec.is_moe(layer):
            rows, h = self.group(layer, op.batch)[:2]
            out = self.out.pop((layer, op.batch), None)
            out = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if out is None else out
            host = self.host_out.pop((layer, op.batch), None)
            if host is not None:  # the experts computed on the CPU (fp32, on the device by now)
                out = out + host.wait()
        else:  # a dense layer's MLP (its span holds the gather and RMSNorm of its input)
            start = ex.tracer.begin()
            rows, h = ex.compute.tokens(st, w, op.batch)
            out = None
        ex.tracer.log_ops("compute", [op.id])
        ex.compute.finish_mlp(st, w, layer, rows, h, out, start=start)
        # the micro-batch's (or the group's) MLP is done: its hidden rows need not stay alive for the step
        whole = op.batch is None or op.batch == self.ctx.shape.n - 1  # the layer's last MLP of the step
        for key in [k for k in self.routed if k[0] == layer and (whole or k[1] == op.batch)]:
            del self.routed[key]

    def _release(self, op: Op) -> None:
        ex = self.ex
        if op.tensor == "dense":
            ex.loads.release_dense(self.result(op.deps[0])[0])
            self.weights.pop(op.layer, None)
            self.dense.pop(op.layer, None)
        elif op.tensor == "expert":
            if any(c.expert == op.expert and c.layer == op.layer for c in self.cold):
                self.deferred.append(op)
                return
            ex.loads.release_expert(self.slot(op.layer, op.expert, op.deps[0]))
        elif op.tensor == "experts":
            for slot in self.result(op.deps[0]).values():
                ex.loads.release_expert(slot)
        else:
            raise ValueError(f"op {op.id}: unknown release of {op.tensor!r}")

    def _lm_head(self, op: Op) -> None:
        self.ex.tracer.log_ops("compute", [op.id])
        self.ex.compute.lm_head(self.st)
