"""Compute ops of the offloaded runtime, on the compute stream: attention, gate, grouped expert calls, the
shared expert / dense MLP, and the per-step state they work on (:class:`StepState`).

Hidden states of the whole batch group stay on the device (``StepState.x`` [B, S, H]); micro-batch ``k`` is
the row range ``cache.rows[k]``. Routed experts accumulate into one fp32 output [T, H] over the valid tokens,
cast once when the layer's MLP finishes. Every op is traced with its FLOPs (for calibration).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from klotski.costs import FFN_CHUNK_TOKENS
from klotski.model.decoder import attention_step
from klotski.model.expert_selection import ExpertSelection, SelectionStats, is_decode_step, route_selected
from klotski.model.layers import rms_norm
from klotski.model.moe import dense_mlp, shared_expert
from klotski.model.router import route
from klotski.runtime.cache import GroupCache
from klotski.runtime.loader import Ticket
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights


def in_chunks(fn, h: torch.Tensor):
    """fn over row chunks of h [T, H] (at most FFN_CHUNK_TOKENS rows each: the MLP workspace the plan
    reserves, ``ModelCosts.ffn_workspace_bytes``), concatenated; None when fn returns None."""
    if h.shape[0] <= FFN_CHUNK_TOKENS:
        return fn(h)
    parts = [fn(h[a : a + FFN_CHUNK_TOKENS]) for a in range(0, h.shape[0], FFN_CHUNK_TOKENS)]
    return None if parts[0] is None else torch.cat(parts)


class StepState:
    """Mutable state of one forward: the group's hidden states [B, S, H], masks, pending KV stores, logits."""

    def __init__(self, cache: GroupCache, S: int):
        self.cache = cache
        self.S = S
        self.x: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [B, S] bool: real (not padding) tokens
        self.masks: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.kv_stores: list[Ticket] = []
        self.all_logits = False
        self.logits: torch.Tensor | None = None


class Compute:
    def __init__(self, spec, w: PlacedWeights, tracer: Tracer, costs, rotary, activation: str, experts_fn,
                 device: torch.device, selection: ExpertSelection | None = None):
        self.spec, self.w, self.tracer, self.costs = spec, w, tracer, costs
        self.rotary, self.act, self.experts_fn, self.device = rotary, activation, experts_fn, device
        # decode-step expert selection (klotski.model.expert_selection); off: the router's output as it is
        self.selection = ExpertSelection.parse(selection)
        self.selection_stats = SelectionStats()
        self._step_ref = None  # weakref to the StepState the last tokens() call served
        self._step_no = 0
        self._resident: dict[int, torch.Tensor] = {}  # layer -> bool [E] device-resident experts
        # set by build_executor: the run loads every expert of a layer whatever the gates pick (the flexgen and
        # layerwise orders), so no expert costs a load of its own and offload-aware selection changes nothing
        self.loads_whole_layer = False

    def attention(self, st: StepState, w: dict, layer: int, k: int, kv) -> None:
        """Attention (+ residual) of micro-batch ``k`` over ``kv`` (its KV cache, or the device staging view of
        it when the cache lives in host memory)."""
        s, e = st.cache.rows[k]
        start = self.tracer.begin()
        st.x[s:e] = attention_step(self.spec, w, st.x[s:e], kv, layer, self.rotary, st.masks[k], st.positions[k])
        proj, score, _ = self.costs.attn_flops(layer, e - s, st.S, st.cache.length)
        self.tracer.end("compute", f"L{layer} attn b{k}", start, op="attn", flops=proj, score_flops=score)

    def tokens(self, st: StepState, w: dict, k: int | None = None):
        """Normed MLP inputs of the valid tokens of micro-batch ``k`` (None: the whole group)
        -> (rows into the flattened [B*S, H] stream, h [T, H])."""
        if self._step_ref is None or self._step_ref() is not st:  # a new forward: the gates that follow are its
            self._step_ref = weakref.ref(st)
            self._step_no += 1
        s, e = (0, st.cache.batch_size) if k is None else st.cache.rows[k]
        valid = torch.zeros_like(st.valid)
        valid[s:e] = st.valid[s:e]
        rows = valid.reshape(-1).nonzero().squeeze(1)
        flat = st.x.reshape(-1, self.spec.hidden_size)
        return rows, rms_norm(flat.index_select(0, rows), w["post_attn_norm"], self.spec.rms_norm_eps)

    def gate(self, w: dict, h: torch.Tensor, layer: int, k, decode: bool | None = None,
             free: torch.Tensor | None = None, inflight=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> (topk_weights [T, top_k], topk_ids [T, top_k]).

        With ``self.selection`` enabled, a decode step's routing goes through batch-aware expert selection over
        this call's T tokens: one micro-batch under the klotski and flexgen orders (their gates run per
        micro-batch), one micro-batch at a time under layerwise. ``decode``: whether this forward is a decode
        step (None: judged from the step the last :meth:`tokens` call served: one column on a non-empty cache).
        ``free`` bool [E]: for "lynx-offload", the experts that cost no load (None: :meth:`free_experts`, with
        ``inflight``: the experts of ``layer`` whose loads the step has already issued, e.g. the prefetched hot
        set, when the caller knows them)."""
        start = self.tracer.begin()
        st = self._step_ref() if self._step_ref is not None else None
        if decode is None:
            decode = st is not None and is_decode_step(st.S, st.cache.length)
        if self.selection.measured and decode:
            self.selection_stats.begin_step(self._step_no)
            if free is None and self.selection.offload_aware:
                free = self.free_experts(layer, inflight, h.device)
            sel = route_selected(self.spec, w, h, self.selection, free)
            self.selection_stats.record(layer, sel.exact_ids, sel.topk_ids, sel.remapped)
            out = (sel.topk_weights, sel.topk_ids)
        else:
            out = route(self.spec, w, h)
        self.tracer.end("compute", f"L{layer} gate b{k}", start, op="gate",
                        flops=self.costs.gate_flops(layer, h.shape[0]))
        return out

    def free_experts(self, layer: int, inflight=None, device=None) -> torch.Tensor:
        """Bool [E]: experts of ``layer`` that cost this step no load: device-resident ones, ``inflight`` (ids
        whose loads are already issued, e.g. prefetched hot experts), and those an earlier micro-batch of this
        step chose (loading or loaded); every expert when the run loads whole layers (``loads_whole_layer``)."""
        device = device or self.device
        if self.loads_whole_layer:
            return torch.ones(self.spec.num_experts, dtype=torch.bool, device=device)
        if layer not in self._resident:
            self._resident[layer] = torch.tensor([self.w.expert_tier(layer, e) == "gpu"
                                                  for e in range(self.spec.num_experts)], dtype=torch.bool)
        free = self._resident[layer].clone()
        extra = set(self.selection_stats.chosen_this_step(layer)) | {int(e) for e in inflight or ()}
        if extra:
            free[sorted(extra)] = True
        return free.to(device)

    def selection_metrics(self) -> dict:
        """Expert selection's counters (:meth:`SelectionStats.as_dict`); empty when its mode is "off"."""
        return self.selection_stats.as_dict(self.selection) if self.selection.measured else {}

    def experts(self, h, topk_weights, topk_ids, slots: dict[int, int], out, layer: int, name: str,
                ids_host: torch.Tensor | None = None) -> None:
        """Accumulate the experts in ``slots`` (expert -> pool slot) over all tokens into ``out`` [T, H] fp32.
        ``ids_host``: topk_ids in host memory when the caller has them (the traced counts then need no
        device sync)."""
        if not slots:
            return
        table = torch.full((self.spec.num_experts,), -1, dtype=torch.int32)
        for e, slot in slots.items():
            table[e] = slot
        ids = (topk_ids.cpu() if ids_host is None else ids_host).long()
        served = table[ids] >= 0  # token-expert pairs these slots serve
        tokens = int(served.sum())
        used = int(torch.unique(ids[served]).numel())  # experts with work: the calls the kernel makes
        start = self.tracer.begin()
        self.experts_fn(h, self.w.pool.w13, self.w.pool.w2, topk_weights, topk_ids,
                        expert_slots=table.to(self.device), out=out, activation=self.act)
        self.tracer.end("compute", f"L{layer} {name}", start, experts=used, op="experts", calls=max(1, used),
                        flops=self.costs.expert_flops(layer, tokens))

    def lm_head(self, st: StepState) -> None:
        """Final norm + LM head -> ``st.logits`` fp32 [B, S, V] (``st.all_logits``) or [B, V] (last column)."""
        x = st.x if st.all_logits else st.x[:, -1:]
        start = self.tracer.begin()
        logits = F.linear(rms_norm(x, self.w.norm, self.spec.rms_norm_eps), self.w.lm_head).float()
        self.tracer.end("compute", "lm_head", start, op="lm_head",
                        flops=self.costs.lm_head_flops(x.shape[0] * x.shape[1]))
        st.logits = logits if st.all_logits else logits[:, 0]

    def finish_mlp(self, st: StepState, w: dict, layer: int, rows, h, routed_out) -> None:
        """x[rows] += routed (fp32 accumulator, cast once) + shared expert, or the dense MLP."""
        start = self.tracer.begin()
        if routed_out is None:
            y = in_chunks(lambda hc: dense_mlp(self.spec, w, hc), h)
        else:
            y = routed_out.to(h.dtype)
            shared = in_chunks(lambda hc: shared_expert(self.spec, w, hc), h)
            if shared is not None:
                y = y + shared
        B, S, H = st.x.shape
        st.x = st.x.reshape(B * S, H).index_add(0, rows, y.to(st.x.dtype)).view(B, S, H)
        self.tracer.end("compute", f"L{layer} {'shared' if routed_out is not None else 'mlp'}", start, op="shared",
                        flops=self.costs.shared_flops(layer, h.shape[0]))
