"""The order of loads and compute per layer under each offloading policy (the Klotski paper's pipeline and
its baselines).

* ``layerwise`` (Accelerate-like): each micro-batch runs through the whole model on its own; every layer's
  weights (attention, gate, all experts) load just before it computes, nothing overlaps.
* ``flexgen`` (zig-zag): the n micro-batches share each layer's load; the next layer's whole weights (all
  experts) load while this layer computes (``plan.overlap``; without it a layer loads when the previous one
  has finished); attention then MoE run micro-batch by micro-batch.
* ``klotski``: the layer's gate and its predicted hot experts were prefetched during the previous layer;
  attention and gate run per micro-batch and each gate starts loading the selected experts that are neither
  resident, hot nor in flight (cold); experts then run expert by expert over the tokens of all n batches,
  resident and hot first, then cold in arrival order, each slot released right after use. After the gates,
  the next layer's weights and hot experts (predicted from this layer's routing by the correlation-aware
  prefetcher) start loading. With ``plan.overlap`` (the planner's "wide, early" variant) the next layer's
  hot experts are issued with its weights when this layer starts, predicted from popularity (the routing
  that would refine them is not known yet), at most all streaming slots but one, so this layer's cold
  experts always find a slot. A klotski plan with ``num_hot=None`` (the planner chose FlexGen's order) runs
  the flexgen runner.

Which runner runs a plan, and with which of its fields, is decided in one place: :func:`runner_for`.
"""
from __future__ import annotations

import torch


class LayerwiseRunner:
    def __init__(self, ex):
        self.ex = ex

    def run(self, st) -> None:
        ex, spec = self.ex, self.ex.spec
        st.prefetch_kv = False
        for k in range(st.cache.num_batches):
            for layer in range(spec.num_layers):
                dense = ex.loads.dense(layer)
                experts = _load_all_experts(ex, layer, "prefetch")
                idx, w = dense.wait()
                ex.compute.attention(st, w, layer, k)
                rows, h = ex.compute.tokens(st, w, k)
                if spec.is_moe(layer):
                    slots = {e: t.wait() for e, t in experts}
                    topk_w, topk_ids = ex.compute.gate(w, h, layer, k)
                    ex.record_routing(layer, topk_ids, None)
                    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
                    ex.compute.experts(h, topk_w, topk_ids, slots, out, layer, f"experts b{k}")
                    for slot in slots.values():
                        ex.loads.release_expert(slot)
                    ex.compute.finish_mlp(st, w, layer, rows, h, out)
                else:
                    ex.compute.finish_mlp(st, w, layer, rows, h, None)
                ex.loads.release_dense(idx)


def _load_all_experts(ex, layer: int, lane: str):
    if not ex.spec.is_moe(layer):
        return []
    return [(e, ex.loads.expert(layer, e, lane)) for e in range(ex.spec.num_experts)]


class FlexGenRunner:
    def __init__(self, ex):
        self.ex = ex

    def _issue(self, st, layer: int) -> None:
        if layer < self.ex.spec.num_layers and layer not in st.dense:
            st.dense[layer] = self.ex.loads.dense(layer)
            st.hot[layer] = _load_all_experts(self.ex, layer, "prefetch")

    def run(self, st) -> None:
        ex, spec = self.ex, self.ex.spec
        overlap = ex.plan is None or ex.plan.overlap
        for layer in range(spec.num_layers):
            self._issue(st, layer)
            if overlap:
                self._issue(st, layer + 1)  # the next layer loads while this one computes
            idx, w = st.dense.pop(layer).wait()
            for k in range(st.cache.num_batches):
                ex.compute.attention(st, w, layer, k)
            experts = st.hot.pop(layer)
            slots = {e: t.wait() for e, t in experts}
            routed = []
            for k in range(st.cache.num_batches):
                rows, h = ex.compute.tokens(st, w, k)
                if not spec.is_moe(layer):
                    ex.compute.finish_mlp(st, w, layer, rows, h, None)
                    continue
                topk_w, topk_ids = ex.compute.gate(w, h, layer, k)
                routed.append(topk_ids)
                out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
                ex.compute.experts(h, topk_w, topk_ids, slots, out, layer, f"experts b{k}")
                ex.compute.finish_mlp(st, w, layer, rows, h, out)
            if routed:
                ex.record_routing(layer, torch.cat(routed), None)
            for slot in slots.values():
                ex.loads.release_expert(slot)
            ex.loads.release_dense(idx)


class KlotskiRunner:
    def __init__(self, ex):
        self.ex = ex
        spec = ex.spec
        self.next_moe = {layer: next((m for m in spec.moe_layers if m > layer), None)
                         for layer in range(-1, spec.num_layers)}
        self.early = ex.plan is not None and ex.plan.overlap

    def hot_budget(self) -> int:
        pool = self.ex.w.pool  # the plan's prefetch width (top_k by default), bounded by the streaming slots
        if pool is None:
            return 0
        if self.early:  # issued before this layer's cold loads: leave them a slot (the pool grants in order)
            return min(self.ex.num_hot, pool.streaming_slots - 1)
        return min(self.ex.num_hot, pool.streaming_slots)

    def _issue_hot(self, st, source: int, prev_topk, hidden=None) -> None:
        """Predict and prefetch the hot experts of the MoE layer after ``source`` (-1: the first), on the
        prefetch lane. ``prev_topk`` [T, k]: ``source``'s routing of the group; ``hidden`` [T, H]: the residual
        rows entering ``source``'s MLP (gate lookahead, when the executor has a predictor)."""
        ex, E = self.ex, self.ex.spec.num_experts
        layer = self.next_moe[source]
        if layer is None or layer in st.hot:
            return
        budget = self.hot_budget()
        if ex.predictor is not None:
            resident = [e for e in range(E) if ex.w.expert_tier(layer, e) == "gpu"]
            streamed = ex.predictor.predict_next(source, hidden, prev_topk, budget, exclude=resident)
        else:
            pred = ex.prefetcher.predict(layer, prev_topk, budget + E) if ex.prefetcher is not None else range(E)
            streamed = [e for e in pred if ex.w.expert_tier(layer, e) != "gpu"][:budget]
        st.predicted[layer] = streamed
        st.hot[layer] = [(e, ex.loads.expert(layer, e, "prefetch")) for e in streamed]

    def run(self, st) -> None:
        ex, spec = self.ex, self.ex.spec
        st.dense[0] = ex.loads.dense(0)
        self._issue_hot(st, -1, None)
        for layer in range(spec.num_layers):
            if layer + 1 < spec.num_layers and layer + 1 not in st.dense:
                st.dense[layer + 1] = ex.loads.dense(layer + 1)
                if self.early and self.next_moe[layer] == layer + 1:
                    self._issue_hot(st, layer, None)
            idx, w = st.dense.pop(layer).wait()
            if spec.is_moe(layer):
                self._moe_layer(st, w, layer)
            else:
                for k in range(st.cache.num_batches):
                    ex.compute.attention(st, w, layer, k)
                rows, h = ex.compute.tokens(st, w)
                ex.compute.finish_mlp(st, w, layer, rows, h, None)
                self._issue_hot(st, layer, st.prev_topk)
            ex.loads.release_dense(idx)

    def _moe_layer(self, st, w, layer: int) -> None:
        ex, E = self.ex, self.ex.spec.num_experts
        hot = st.hot.pop(layer, [])
        pending = {e for e, _ in hot}
        cold: list[tuple[int, object]] = []
        hs, tws, tids, rows_all, tids_host = [], [], [], [], []
        for k in range(st.cache.num_batches):
            ex.compute.attention(st, w, layer, k)
            rows, h = ex.compute.tokens(st, w, k)
            topk_w, topk_ids = ex.compute.gate(w, h, layer, k)
            tids_host.append(topk_ids.cpu())  # the host decides which experts to load
            counts = torch.bincount(tids_host[-1].reshape(-1).long(), minlength=E)
            for e in sorted(torch.nonzero(counts).flatten().tolist(), key=lambda e: (-int(counts[e]), e)):
                if e in pending or ex.w.expert_tier(layer, e) == "gpu":
                    continue
                pending.add(e)
                cold.append((e, ex.loads.expert(layer, e, "expert_io")))
            hs.append(h)
            tws.append(topk_w)
            tids.append(topk_ids)
            rows_all.append(rows)
        h, topk_w, topk_ids = torch.cat(hs), torch.cat(tws), torch.cat(tids)
        rows = torch.cat(rows_all)
        ids_host = torch.cat(tids_host)
        ex.record_routing(layer, topk_ids, st.predicted.pop(layer, None))
        st.prev_topk = topk_ids
        resid = None
        if ex.predictor is not None:  # the residual stream entering this MLP: the next router's lookahead input
            resid = st.x.reshape(-1, ex.spec.hidden_size).index_select(0, rows)
        self._issue_hot(st, layer, topk_ids, resid)
        used = set(torch.unique(ids_host).tolist())
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        # resident and hot experts first, in one grouped call
        first = {e: ex.w.expert_home[(layer, e)][1] for e in used if ex.w.expert_tier(layer, e) == "gpu"}
        hot_slots = {e: t.wait() for e, t in hot}
        first.update({e: s for e, s in hot_slots.items() if e in used})
        for e, s in hot_slots.items():
            if e not in used:
                ex.loads.release_expert(s)
        ex.compute.experts(h, topk_w, topk_ids, first, out, layer, "hot experts", ids_host)
        for s in first.values():
            ex.loads.release_expert(s)
        # cold experts in arrival order, grouping those that already arrived
        i = 0
        while i < len(cold):
            batch = {cold[i][0]: cold[i][1].wait()}
            i += 1
            while i < len(cold) and cold[i][1].done():
                batch[cold[i][0]] = cold[i][1].wait()
                i += 1
            ex.compute.experts(h, topk_w, topk_ids, batch, out, layer, f"cold x{len(batch)}", ids_host)
            for s in batch.values():
                ex.loads.release_expert(s)
        ex.compute.finish_mlp(st, w, layer, rows, h, out)


POLICY_RUNNERS = {"layerwise": LayerwiseRunner, "flexgen": FlexGenRunner, "klotski": KlotskiRunner}


def runner_for(ex):
    """The runner of the executor's plan (:func:`klotski.runtime.planning.order_of`); no plan: its policy's."""
    from klotski.runtime.planning import order_of

    return POLICY_RUNNERS[order_of(ex.plan) if ex.plan is not None else ex.policy](ex)
