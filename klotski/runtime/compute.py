"""Compute ops of the offloaded runtime, on the compute stream: attention, gate, grouped expert calls, the
shared expert / dense MLP, and the per-step state they work on (:class:`StepState`).

Hidden states of the whole batch group stay on the device (``StepState.x`` [B, S, H]); micro-batch ``k`` is
the row range ``cache.rows[k]``. Routed experts accumulate into one fp32 output [T, H] over the valid tokens,
cast once when the layer's MLP finishes. Every op is traced with its FLOPs; the tracer adds the cost of the
builder's ops it ran (``cost``: FLOPs, bytes, calls), which calibration and the per-op bench price.

Host-side compute (:mod:`klotski.program.host`) runs on lanes of its own: attention over a KV cache in host
memory (:meth:`Compute.attention_qkv` on the device, :meth:`Compute.attention_on_host` on the ``cpu_attn``
lane, :meth:`Compute.attention_out` back on the device) and routed experts computed from their host copies
(:meth:`Compute.experts_on_host` on the ``cpu_experts`` lane, its fp32 output added before the layer's MLP
finishes). Host work is traced on its lane with the host clock.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from klotski.costs import FFN_CHUNK_TOKENS
from klotski.model.decoder import ATTENTION_SPLIT, attention_step
from klotski.model.expert_selection import ExpertSelection, SelectionStats, is_decode_step, route_selected
from klotski.model.layers import rms_norm
from klotski.model.moe import dense_mlp, shared_expert
from klotski.model.router import route
from klotski.runtime.cache import GroupCache
from klotski.runtime.loader import Ticket
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights
from klotski.triton_kernels.fused_moe import fused_moe_torch


def _event(device: torch.device):
    """A CUDA event on the current stream (what a lane waits for before reading the compute stream's
    tensors); None on CPU."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def in_chunks(fn, h: torch.Tensor):
    """fn over row chunks of h [T, H] (at most FFN_CHUNK_TOKENS rows each: the MLP workspace the plan
    reserves, ``ModelCosts.ffn_workspace_bytes``), concatenated; None when fn returns None."""
    if h.shape[0] <= FFN_CHUNK_TOKENS:
        return fn(h)
    parts = [fn(h[a : a + FFN_CHUNK_TOKENS]) for a in range(0, h.shape[0], FFN_CHUNK_TOKENS)]
    return None if parts[0] is None else torch.cat(parts)


class StepState:
    """Mutable state of one forward: the group's hidden states [B, S, H], masks, pending KV stores, logits.
    ``decode``: whether this forward is a decode step (None: judged by :func:`is_decode_step`; the executor says
    False for every pass of a prefill run in chunks, a one-column chunk included)."""

    def __init__(self, cache: GroupCache, S: int, decode: bool | None = None):
        self.cache = cache
        self.S = S
        self.decode = is_decode_step(S, cache.length) if decode is None else decode
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
        proj, score, _ = self.costs.attn_flops(layer, e - s, st.S, st.cache.length)  # priced outside the span
        start = self.tracer.begin()
        st.x[s:e] = attention_step(self.spec, w, st.x[s:e], kv, layer, self.rotary, st.masks[k], st.positions[k])
        self.tracer.end("compute", f"L{layer} attn b{k}", start, op="attn", flops=proj, score_flops=score)

    # ---- attention over a KV cache in host memory ---------------------------------------------------------
    def attention_qkv(self, st: StepState, w: dict, layer: int, k: int):
        """Norm + Q/K/V projections of micro-batch ``k`` on the device -> (parts, the event they are ready at)
        (:data:`klotski.model.decoder.ATTENTION_SPLIT`: GQA q / k / v, MLA the absorbed query, latent, rope key)."""
        s, e = st.cache.rows[k]
        out_flops, _, _, _ = self.costs.attn_host_split(layer, (e - s) * st.S)
        proj, _, _ = self.costs.attn_flops(layer, e - s, st.S, st.cache.length)
        start = self.tracer.begin()
        h = rms_norm(st.x[s:e], w["input_norm"], self.spec.rms_norm_eps)
        parts = ATTENTION_SPLIT[self.spec.attention][0](self.spec, w, h, self.rotary, st.positions[k])
        self.tracer.end("compute", f"L{layer} qkv b{k}", start, op="attn_qkv", flops=max(0.0, proj - out_flops))
        return parts, _event(self.device)

    def attention_on_host(self, st: StepState, layer: int, k: int, parts, ready, lanes, op_ids=()) -> Ticket:
        """On the ``cpu_attn`` lane: ``parts`` to host memory, attention of micro-batch ``k`` over its host KV
        cache (appending this step's columns there), the output back to the device -> Ticket(output)."""
        cache = st.cache.micro[k]
        mask = st.masks[k]
        split = ATTENTION_SPLIT[self.spec.attention][1]
        _, score, kv_read = self.costs.attn_flops(layer, st.cache.rows[k][1] - st.cache.rows[k][0], st.S,
                                                  st.cache.length)

        def job(ln):
            self.tracer.log_ops("cpu_attn", op_ids)
            if ready is not None:
                ln.stream.wait_event(ready)
            host = tuple(t.to("cpu") for t in parts)
            with ln.host_cpu:  # the span: the compute alone (the copies and the wait for the CPU are ops of their own)
                t0 = self.tracer.now()
                out = split(self.spec, host, cache, layer, mask.to("cpu"))
                t1 = self.tracer.now()
            back = out.to(self.device)
            self.tracer.host_span("cpu_attn", f"L{layer} attn b{k}", t0, t1, op="attn_core", score_flops=score,
                                  kv_bytes=kv_read)
            return back

        return lanes["cpu_attn"].submit(f"L{layer} b{k} cpu attention", job)

    def attention_out(self, st: StepState, w: dict, layer: int, k: int, out: torch.Tensor) -> None:
        """The output projection (+ residual) of micro-batch ``k`` on the device."""
        s, e = st.cache.rows[k]
        flops, _, _, _ = self.costs.attn_host_split(layer, (e - s) * st.S)
        start = self.tracer.begin()
        st.x[s:e] = st.x[s:e] + ATTENTION_SPLIT[self.spec.attention][2](self.spec, w, out)
        self.tracer.end("compute", f"L{layer} attn out b{k}", start, op="attn_out", flops=flops)

    # ---- routed experts from their host copies -------------------------------------------------------------
    def experts_on_host(self, h, topk_weights, ids_host, experts: tuple[int, ...], layer: int, lanes,
                        op_ids=()) -> Ticket:
        """On the ``cpu_experts`` lane: each disk-tier expert of ``experts`` read into host memory, the hidden
        rows h [T, H] to host memory, the ``experts`` computed there (host-tier ones with their weights in place,
        cast to h's dtype when stored otherwise, as a load would), the fp32 output [T, H] back to the device
        -> Ticket(output)."""
        ready = _event(self.device)
        E = self.spec.num_experts
        homes = [self.w.expert_home[(layer, e)] for e in experts]
        for e, (tier, _) in zip(experts, homes):
            if tier not in ("cpu", "store", "disk"):
                raise RuntimeError(f"layer {layer} expert {e} is on {tier}, neither in host memory nor on disk: "
                                   f"it is not computed on the CPU")
        tokens = int(sum(int((ids_host == e).sum()) for e in experts))

        def job(ln):
            self.tracer.log_ops("cpu_experts", op_ids)
            weights = []
            for e, (tier, what) in zip(experts, homes):  # the reads first: outside the host CPU
                if tier == "cpu":
                    weights.append(what)
                    continue
                t0 = self.tracer.now()
                w13, w2, read = self.w.read_expert_host(layer, e)
                weights.append((w13, w2))
                self.tracer.host_span("cpu_experts", f"L{layer} e{e} read", t0, op="read", tier=tier,
                                      read_bytes=read, read_s=self.w.take_read_seconds())
            if ready is not None:
                ln.stream.wait_event(ready)
            x, tw = h.to("cpu"), topk_weights.to("cpu")
            out = torch.zeros(x.shape, dtype=torch.float32)
            table = torch.full((E,), -1, dtype=torch.int32)
            with ln.host_cpu:  # the span: the compute alone, as for attention
                t0 = self.tracer.now()
                for e, (w13, w2) in zip(experts, weights):
                    if w13.dtype != x.dtype:
                        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
                    table.fill_(-1)
                    table[e] = 0
                    fused_moe_torch(x, w13[None], w2[None], tw, ids_host, expert_slots=table, out=out,
                                    activation=self.act)
                t1 = self.tracer.now()
            back = out.to(self.device)
            self.tracer.host_span("cpu_experts", f"L{layer} cpu x{len(experts)}", t0, t1, op="experts",
                                  experts=len(experts), flops=self.costs.expert_flops(layer, tokens))
            return back

        return lanes["cpu_experts"].submit(f"L{layer} cpu experts", job)

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
             free: torch.Tensor | None = None, inflight=None, start=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> (topk_weights [T, top_k], topk_ids [T, top_k]).

        With ``self.selection`` enabled, a decode step's routing goes through batch-aware expert selection over
        this call's T tokens: one micro-batch under the klotski and flexgen orders (their gates run per
        micro-batch), one micro-batch at a time under layerwise. ``decode``: whether this forward is a decode
        step (None: the step the last :meth:`tokens` call served says, ``StepState.decode``).
        ``free`` bool [E]: for "lynx-offload", the experts that cost no load (None: :meth:`free_experts`, with
        ``inflight``: the experts of ``layer`` whose loads the step has already issued, e.g. the prefetched hot
        set, when the caller knows them). ``start``: the span's start when the caller began it before computing
        ``h`` (:meth:`tokens`: the gate op's input is its work too)."""
        flops = self.costs.gate_flops(layer, h.shape[0])
        start = self.tracer.begin() if start is None else start
        st = self._step_ref() if self._step_ref is not None else None
        if decode is None:
            decode = st is not None and st.decode
        if self.selection.measured and decode:
            self.selection_stats.begin_step(self._step_no)
            if free is None and self.selection.offload_aware:
                free = self.free_experts(layer, inflight, h.device)
            sel = route_selected(self.spec, w, h, self.selection, free)
            self.selection_stats.record(layer, sel.exact_ids, sel.topk_ids, sel.remapped)
            out = (sel.topk_weights, sel.topk_ids)
        else:
            out = route(self.spec, w, h)
        self.tracer.end("compute", f"L{layer} gate b{k}", start, op="gate", flops=flops)
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
        flops = self.costs.expert_flops(layer, tokens)
        start = self.tracer.begin()
        self.experts_fn(h, self.w.pool.w13, self.w.pool.w2, topk_weights, topk_ids,
                        expert_slots=table.to(self.device), out=out, activation=self.act)
        self.tracer.end("compute", f"L{layer} {name}", start, experts=used, op="experts", calls=max(1, used),
                        flops=flops)

    def lm_head(self, st: StepState) -> None:
        """Final norm + LM head -> ``st.logits`` fp32 [B, S, V] (``st.all_logits``) or [B, V] (last column)."""
        x = st.x if st.all_logits else st.x[:, -1:]
        flops = self.costs.lm_head_flops(x.shape[0] * x.shape[1])
        start = self.tracer.begin()
        logits = F.linear(rms_norm(x, self.w.norm, self.spec.rms_norm_eps), self.w.lm_head).float()
        self.tracer.end("compute", "lm_head", start, op="lm_head", flops=flops)
        st.logits = logits if st.all_logits else logits[:, 0]

    def finish_mlp(self, st: StepState, w: dict, layer: int, rows, h, routed_out, start=None) -> None:
        """x[rows] += routed (fp32 accumulator, cast once) + shared expert, or the dense MLP (``start``: the span's
        start when the caller began it before computing ``h``)."""
        flops = self.costs.shared_flops(layer, h.shape[0])
        start = self.tracer.begin() if start is None else start
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
                        flops=flops)
