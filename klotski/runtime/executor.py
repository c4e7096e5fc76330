"""The offloaded executor: ResidentModel's protocol (``new_cache`` / ``forward``) over placed weights.

One ``forward`` runs one step of a batch group (B rows = n micro-batches). Per layer the policy
(:mod:`klotski.runtime.policies`) orders the work; this class provides the pieces it orders:

* loads, issued on loader lanes in schedule order: a layer's streamed attention/gate/shared weights into a
  dense buffer (``load_dense``), one routed expert into an expert pool slot (``load_expert``), a micro-batch's
  KV layer into a staging buffer (``load_kv``) and back (``store_kv``);
* compute on the compute stream: ``attention`` of one micro-batch, ``gate`` of one micro-batch, grouped expert
  calls accumulating into one fp32 output (``experts``), the shared expert / dense MLP.

Every load returns a :class:`~klotski.runtime.loader.Ticket`; compute waits on it right before use, and every
slot is released right after its last use. An interrupted forward (any exception, KeyboardInterrupt
included) cancels the pools, drains the lanes and resets, so the executor stays usable.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from klotski.costs import FFN_CHUNK_TOKENS
from klotski.model.decoder import attention_step, make_rotary
from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.moe import dense_mlp, expert_activation, shared_expert
from klotski.model.router import route
from klotski.prefetch import CorrelationPrefetcher, PrefetchStats
from klotski.runtime.cache import GroupCache
from klotski.runtime.loader import Lanes, Ticket
from klotski.runtime.memory import BudgetError, TierMeter, nbytes
from klotski.runtime.placement import Layout
from klotski.runtime.pool import SlotPool
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights
from klotski.units import format_bytes

SEQ_DIM = -2  # the sequence (capacity) dim of every KV cache tensor: [B, kv_heads, cap, D] / MLA [B, cap, r]


def activation_bytes(costs, num_batches: int, B: int, S: int, kv_len: int, all_logits: bool = False) -> int:
    """A forward's transient device memory: :meth:`klotski.costs.ModelCosts.activation_bytes`, the estimate
    the planner's schedule reserves too. It is an estimate, not a measurement: on CPU torch exposes no
    allocator statistics, so ``peak_gpu_bytes`` counts it as held for the whole forward (an upper bound of
    what the forward allocates: hidden states, the widest FFN intermediate, one batch's attention scores)."""
    return costs.activation_bytes(B, num_batches, S, kv_len, all_logits)


def _in_chunks(fn, h: torch.Tensor):
    """fn over row chunks of h [T, H] (at most FFN_CHUNK_TOKENS rows each: the MLP workspace the plan
    reserves, ``ModelCosts.ffn_workspace_bytes``), concatenated; None when fn returns None."""
    if h.shape[0] <= FFN_CHUNK_TOKENS:
        return fn(h)
    parts = [fn(h[a : a + FFN_CHUNK_TOKENS]) for a in range(0, h.shape[0], FFN_CHUNK_TOKENS)]
    return None if parts[0] is None else torch.cat(parts)


def ready(result) -> Ticket:
    t = Ticket("ready")
    t.finish(result)
    return t


class OffloadedExecutor:
    def __init__(self, weights, layout: Layout, device: torch.device, dtype: torch.dtype, policy: str,
                 gpu: TierMeter, cpu: TierMeter, num_batches: int, batch_size: int,
                 prefetcher: CorrelationPrefetcher | None, experts_fn, expert_order=None, store=None, costs=None,
                 plan=None):
        self.spec = weights.spec
        if costs is None:
            from klotski.runtime.planning import model_costs

            costs = model_costs(self.spec, weights.spec.torch_dtype or "bfloat16", dtype)
        self.costs = costs  # bytes / FLOPs per op (traced with each span, for calibration)
        self.plan = plan  # the planner's Plan this executor runs (None: built by hand)
        self.num_hot = (plan.num_hot if plan is not None and plan.num_hot else None) or max(self.spec.top_k, 1)
        self.prediction: dict = {}  # set by klotski.runtime.prepare_run: the plan's prediction for this run
        self.build_args: dict = {}  # how build_offloaded made this executor (for re-planning)
        self.device, self.dtype, self.policy = device, dtype, policy
        self.cuda = device.type == "cuda"
        self.layout = layout
        self.gpu, self.cpu = gpu, cpu
        self.num_batches, self.batch_size = num_batches, batch_size
        self.group_size = num_batches * batch_size
        self.prefetcher = prefetcher
        self.experts_fn = experts_fn
        self.w = PlacedWeights(weights, layout, device, dtype, gpu, cpu, expert_order, store=store)
        self.dense_pool = SlotPool(list(range(max(layout.dense_buffers, 1))), "dense buffers")
        self.dense_bufs: list[dict[str, torch.Tensor]] = [{} for _ in range(max(layout.dense_buffers, 1))]
        self.kv_pool = SlotPool([0, 1], "kv staging")
        self.kv_bufs: list[dict[str, torch.Tensor]] = [{}, {}]
        self.kv_staging_bytes = 0
        self.rotary = make_rotary(self.spec, device)
        self.lanes = Lanes(device)
        self.tracer = Tracer(device)
        self.stats = PrefetchStats()
        self.act = expert_activation(self.spec) if self.spec.moe_layers else "silu"
        self._cache_bytes = (None, 0)
        self.time = {"prefill_s": 0.0, "decode_s": 0.0, "forwards": 0, "tokens_in": 0, "prefill_chunks": 0}
        self.closed = False
        from klotski.runtime.policies import POLICY_RUNNERS

        self.runner = POLICY_RUNNERS[policy](self)

    # ---- protocol --------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor) -> GroupCache:
        per_token = sum(self.spec.kv_cache_elems_per_token(i) for i in range(self.spec.num_layers))
        size = torch.empty((), dtype=self.dtype).element_size()
        need = batch_size * capacity * per_token * size
        old = self._cache_bytes
        if old[0] is not None:
            (self.gpu if old[0] == "gpu" else self.cpu).free("kv cache", old[1])
        reserve = self.activation_bytes(batch_size, 1, capacity)
        tier = "gpu" if self.layout.placement.kv == "gpu" and (
            self.gpu.budget is None or self.gpu.used + need + reserve <= self.gpu.budget) else "cpu"
        if tier == "cpu":
            self.cpu.hold("kv cache", need)
        else:
            self.gpu.hold("kv cache", need)
        self._cache_bytes = (tier, need)
        return GroupCache(self.spec.num_layers, pad, self.num_batches, capacity, tier, self.device)

    def activation_bytes(self, B: int, S: int, kv_len: int, all_logits: bool = False) -> int:
        return activation_bytes(self.costs, self.num_batches, B, S, kv_len, all_logits) + self.kv_staging_bytes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: GroupCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids [B, S] (left-padded) -> fp32 logits [B, S, V] or [B, V].

        When the group's activations for all S columns do not fit the device budget, the columns run in
        chunks (chunked prefill over the same KV cache: the same result, more weight traffic)."""
        if self.closed:
            raise RuntimeError("executor is closed")
        B, S = input_ids.shape
        room = (self.gpu.budget - self.gpu.used) if self.gpu.budget is not None else None
        chunk = S
        while room is not None and chunk > 1 and self.activation_bytes(B, chunk, cache.length + chunk, all_logits) > room:
            chunk = (chunk + 1) // 2
        act = self.activation_bytes(B, chunk, cache.length + chunk, all_logits)
        if room is not None and act > room:
            raise BudgetError(
                f"gpu memory budget {format_bytes(self.gpu.budget)} is too small for this batch group "
                f"({B} sequences): activations of one token column need {format_bytes(act)} on top of "
                f"{format_bytes(self.gpu.used)} held; use fewer sequences per group or a larger gpu_memory "
                f"(at least {format_bytes(self.gpu.used + act)})"
            )
        outs = []
        if S > 1:
            self.time["prefill_chunks"] = max(self.time["prefill_chunks"], -(-S // chunk))
        for c in range(0, S, chunk):
            outs.append(self._timed_forward(input_ids[:, c : c + chunk], cache, all_logits, act, prefill=S > 1))
        return torch.cat(outs, dim=1) if all_logits else outs[-1]

    def _timed_forward(self, input_ids, cache, all_logits, act: int, prefill: bool) -> torch.Tensor:
        self.gpu.hold("activations", act, check=False)
        window = self.tracer.start_window()
        t0 = time.perf_counter()
        try:
            logits = self._forward(input_ids, cache, all_logits)
        except BaseException:
            self.abort()
            raise
        finally:
            self.gpu.free("activations", act)
        self.tracer.end_window(window)
        self.time["prefill_s" if prefill else "decode_s"] += time.perf_counter() - t0
        self.time["forwards"] += 1
        return logits

    def _forward(self, input_ids, cache: GroupCache, all_logits):
        B, S = input_ids.shape
        ids = input_ids.to(self.device)
        st = StepState(self, cache, S)
        st.x = F.embedding(ids, self.w.embed)
        cols = torch.arange(cache.length, cache.length + S, device=self.device)
        st.valid = cols[None, :] >= cache.pad[:, None]
        for k, (s, e) in enumerate(cache.rows):
            mc = cache.micro[k]
            mc.pad, mc.length = cache.device_pads[k], cache.length
            st.masks.append(mc.key_mask(S, self.device))
            st.positions.append(mc.positions(S, self.device))
            if cache.tier == "cpu":
                mc.pad = mc.pad.cpu()
        if self.prefetcher is not None:
            self.prefetcher.reset_sequence()
        self.runner.run(st)
        for t in st.kv_stores:
            t.wait()
        cache.length += S
        for mc in cache.micro:
            mc.length = cache.length
        x = st.x if all_logits else st.x[:, -1:]
        start = self.tracer.begin()
        logits = F.linear(rms_norm(x, self.w.norm, self.spec.rms_norm_eps), self.w.lm_head).float()
        self.tracer.end("compute", "lm_head", start, op="lm_head", flops=self.costs.lm_head_flops(x.shape[0] * x.shape[1]))
        return logits if all_logits else logits[:, 0]

    # ---- loads -----------------------------------------------------------------------------------------
    def load_dense(self, layer: int, lane: str = "prefetch") -> Ticket:
        """The layer's weights as one dict (resident + streamed into a dense buffer) -> (buffer or None, w)."""
        keys = self.w.streamed_keys(layer)
        if not keys:
            return ready((None, self.w.resident[layer]))
        ticket = self.dense_pool.reserve()

        def job(ln):
            idx, start = self._begin_load(self.dense_pool, ticket, ln)
            buf = self.dense_bufs[idx]
            for k in [k for k in buf if k not in keys]:
                del buf[k]
            moved = read = 0
            for key, shape in keys.items():
                dt = self.w.buffer_dtype(key)
                if key not in buf or tuple(buf[key].shape) != shape or buf[key].dtype != dt:
                    buf[key] = torch.empty(shape, dtype=dt, device=self.device)
                src = self.w.source(layer, key)
                n = self.w.fill(buf[key], src)
                moved += n
                read += n if isinstance(src, list) else 0  # disk pieces (host copies are tensors / Fp8Weight)
            self.tracer.end(lane, f"L{layer} weights", start, ln.stream, bytes=moved, tier="disk" if read else "cpu",
                            read_bytes=read, read_s=self.w.take_read_seconds())
            return idx, {**self.w.resident[layer], **{k: buf[k] for k in keys}}

        return self.lanes[lane].submit(f"L{layer} weights", job)

    def _begin_load(self, pool: SlotPool, ticket, ln):
        """On lane ``ln``: take the reserved buffer (its stream waits until the buffer's last reader is done),
        start the lane's span and its read-seconds count. -> (buffer index, span start)."""
        idx, ev = pool.acquire(ticket)
        if ev is not None:
            ln.stream.wait_event(ev)
        start = self.tracer.begin(ln.stream)
        self.w.take_read_seconds()
        return idx, start

    def release_dense(self, idx) -> None:
        if idx is not None:
            self.dense_pool.release(idx, self._compute_event())

    def load_expert(self, layer: int, e: int, lane: str) -> Ticket:
        """A routed expert in a device slot -> slot index (resident experts: their permanent slot)."""
        tier, what = self.w.expert_home[(layer, e)]
        if tier == "gpu":
            return ready(what)
        pool = self.w.pool
        ticket = pool.slots.reserve()

        def job(ln):
            slot, start = self._begin_load(pool.slots, ticket, ln)
            try:
                if tier == "cpu":
                    moved = self.w.fill(pool.w13[slot], what[0]) + self.w.fill(pool.w2[slot], what[1])
                elif tier == "store":
                    moved = self.w.read_record(what, pool.w13[slot], pool.w2[slot])
                else:
                    moved = self.w.fill(pool.w13[slot], what[0]) + self.w.fill(pool.w2[slot], [what[1]])
            except BaseException:
                pool.slots.release(slot)
                raise
            self.tracer.end(lane, f"L{layer} e{e}", start, ln.stream, bytes=moved, tier=tier,
                            read_bytes=moved if tier in ("disk", "store") else 0, read_s=self.w.take_read_seconds())
            return slot

        return self.lanes[lane].submit(f"L{layer} e{e}", job)

    def release_expert(self, slot: int) -> None:
        if slot >= self.w.pool.num_pinned:
            self.w.pool.slots.release(slot, self._compute_event())

    def _compute_event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def load_kv(self, st: "StepState", layer: int, k: int) -> Ticket:
        """Micro-batch ``k``'s KV of ``layer`` into a device staging buffer -> (buffer, KVCache view)."""
        cache = st.cache
        ticket = self.kv_pool.reserve()
        rows = cache.rows[k][1] - cache.rows[k][0]

        def job(ln):
            idx, start = self._begin_load(self.kv_pool, ticket, ln)
            view = KVCache(self.spec.num_layers, rows, cache.capacity, cache.device_pads[k])
            view.length = cache.length
            moved = 0
            filled = cache.length  # columns written by earlier steps; this step appends after them
            for name, host in cache.micro[k].layers[layer].items():
                buf = self.kv_bufs[idx].get(name)
                if buf is None or buf.shape[1:] != host.shape[1:] or buf.shape[0] < rows:
                    shape = (max(host.shape[0], -(-cache.batch_size // cache.num_batches)), *host.shape[1:])
                    if buf is not None:
                        self.gpu.free("kv staging", nbytes(buf))
                    buf = torch.empty(shape, dtype=host.dtype, device=self.device)
                    self.gpu.hold("kv staging", nbytes(buf), check=False)
                    self.kv_bufs[idx][name] = buf
                view.layers[layer][name] = buf[:rows]
                src = host.narrow(SEQ_DIM, 0, filled)  # the filled columns only, not the whole capacity
                view.layers[layer][name].narrow(SEQ_DIM, 0, filled).copy_(src, non_blocking=self.cuda)
                moved += src.numel() * src.element_size()
            self.w.counters.add("kv_h2d", moved)
            self.tracer.end("kv_load", f"L{layer} b{k} kv", start, ln.stream, bytes=moved)
            return idx, view

        return self.lanes["kv_load"].submit(f"L{layer} b{k} kv load", job)

    def store_kv(self, st: "StepState", layer: int, k: int, idx: int, view: KVCache) -> Ticket:
        cache = st.cache
        after = self._compute_event()
        first, count = cache.length, st.S  # the columns this step appended

        def job(ln):
            if after is not None:
                ln.stream.wait_event(after)
            start = self.tracer.begin(ln.stream)
            moved = 0
            home = cache.micro[k].layers[layer]
            for name, t in view.layers[layer].items():
                if name not in home:
                    home[name] = torch.zeros(t.shape, dtype=t.dtype, pin_memory=self.cuda)
                new = t.narrow(SEQ_DIM, first, count)
                home[name].narrow(SEQ_DIM, first, count).copy_(new, non_blocking=self.cuda)
                moved += new.numel() * new.element_size()
            done = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record(ln.stream)
                done.synchronize()
            self.w.counters.add("kv_d2h", moved)
            self.tracer.end("kv_store", f"L{layer} b{k} kv", start, ln.stream, bytes=moved)
            self.kv_pool.release(idx, done)

        return self.lanes["kv_store"].submit(f"L{layer} b{k} kv store", job)

    # ---- compute ---------------------------------------------------------------------------------------
    def attention(self, st: "StepState", w: dict, layer: int, k: int) -> None:
        """Attention (+ residual) of micro-batch ``k``, its KV loaded/stored when the cache is in host memory."""
        s, e = st.cache.rows[k]
        cache = st.cache
        if cache.tier == "cpu":
            nxt = (layer, k + 1) if k + 1 < cache.num_batches else (layer + 1, 0)
            if (layer, k) not in st.kv_loads:
                st.kv_loads[(layer, k)] = self.load_kv(st, layer, k)
            if nxt[0] < self.spec.num_layers and nxt not in st.kv_loads and st.prefetch_kv:
                st.kv_loads[nxt] = self.load_kv(st, *nxt)
            idx, kv = st.kv_loads.pop((layer, k)).wait()
        else:
            kv = cache.micro[k]
        start = self.tracer.begin()
        st.x[s:e] = attention_step(self.spec, w, st.x[s:e], kv, layer, self.rotary, st.masks[k], st.positions[k])
        proj, score, _ = self.costs.attn_flops(layer, e - s, st.S, cache.length)
        self.tracer.end("compute", f"L{layer} attn b{k}", start, op="attn", flops=proj, score_flops=score)
        if cache.tier == "cpu":
            st.kv_stores.append(self.store_kv(st, layer, k, idx, kv))

    def tokens(self, st: "StepState", w: dict, k: int | None = None):
        """Normed MLP inputs of the valid tokens of micro-batch ``k`` (None: the whole group)
        -> (rows into the flattened [B*S, H] stream, h [T, H])."""
        s, e = (0, st.cache.batch_size) if k is None else st.cache.rows[k]
        valid = torch.zeros_like(st.valid)
        valid[s:e] = st.valid[s:e]
        rows = valid.reshape(-1).nonzero().squeeze(1)
        flat = st.x.reshape(-1, self.spec.hidden_size)
        return rows, rms_norm(flat.index_select(0, rows), w["post_attn_norm"], self.spec.rms_norm_eps)

    def gate(self, w: dict, h: torch.Tensor, layer: int, k) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.tracer.begin()
        out = route(self.spec, w, h)
        self.tracer.end("compute", f"L{layer} gate b{k}", start, op="gate",
                        flops=self.costs.gate_flops(layer, h.shape[0]))
        return out

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

    def finish_mlp(self, st: "StepState", w: dict, layer: int, rows, h, routed_out) -> None:
        """x[rows] += routed (fp32 accumulator, cast once) + shared expert, or the dense MLP."""
        start = self.tracer.begin()
        if routed_out is None:
            y = _in_chunks(lambda hc: dense_mlp(self.spec, w, hc), h)
        else:
            y = routed_out.to(h.dtype)
            shared = _in_chunks(lambda hc: shared_expert(self.spec, w, hc), h)
            if shared is not None:
                y = y + shared
        B, S, H = st.x.shape
        st.x = st.x.reshape(B * S, H).index_add(0, rows, y.to(st.x.dtype)).view(B, S, H)
        self.tracer.end("compute", f"L{layer} {'shared' if routed_out is not None else 'mlp'}", start, op="shared",
                        flops=self.costs.shared_flops(layer, h.shape[0]))

    def record_routing(self, layer: int, topk_ids: torch.Tensor, predicted: list[int] | None) -> None:
        if self.prefetcher is not None:
            self.prefetcher.record(layer, topk_ids)
        if predicted:
            self.stats.update(predicted, topk_ids, self.spec.num_experts)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def abort(self) -> None:
        """After an interrupted forward: stop waiting loads, drop queued jobs, free every slot."""
        pools = [self.dense_pool, self.kv_pool] + ([self.w.pool.slots] if self.w.pool is not None else [])
        for p in pools:
            p.cancel()
        self.lanes.drain()
        if self.cuda:
            torch.cuda.synchronize()
        for p in pools:
            p.reset()

    def reset_metrics(self) -> None:
        self.w.counters.reset()
        self.tracer.reset()
        self.stats = PrefetchStats()
        self.time = {"prefill_s": 0.0, "decode_s": 0.0, "forwards": 0, "tokens_in": 0, "prefill_chunks": 0}
        self.gpu.reset_peak()
        self.cpu.reset_peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def metrics(self) -> dict:
        c = self.w.counters
        out = {
            "policy": self.policy,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
            "prefill_s": self.time["prefill_s"],
            "decode_s": self.time["decode_s"],
            "bubble_fraction": self.tracer.bubble_fraction,
            "bytes_disk_read": c.get("disk_read"),
            "bytes_h2d": c.get("h2d"),
            "bytes_kv_h2d": c.get("kv_h2d"),
            "bytes_kv_d2h": c.get("kv_d2h"),
            "peak_gpu_bytes": self.gpu.measured_peak(self.device),
            "peak_cpu_bytes": self.cpu.peak,
            "gpu_budget": self.gpu.budget,
            "cpu_budget": self.cpu.budget,
            "placement": self.layout.describe(self.spec.num_experts),
            "kv_tier": self._cache_bytes[0],
            "weights_per_tier": self.w.tier_bytes(),
            "prefill_chunks": self.time["prefill_chunks"],
        }
        out.update(self.stats.as_dict())
        if self.plan is not None:
            from klotski.runtime.planning import prediction_metrics

            out.update(prediction_metrics(self))
        return out

    def write_trace(self, path: str) -> None:
        self.tracer.write_chrome(path)

    def write_timeline(self, path: str) -> None:
        self.tracer.write_timeline(path, f"{self.policy}: bubble fraction {self.tracer.bubble_fraction:.1%}")

    def close(self) -> None:
        if not self.closed:
            self.lanes.close()
            self.w.close()
            self.closed = True

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class StepState:
    """Mutable state of one forward: the group's hidden states, masks, in-flight loads."""

    def __init__(self, ex: OffloadedExecutor, cache: GroupCache, S: int):
        self.cache = cache
        self.S = S
        self.x: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.masks: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.kv_loads: dict[tuple[int, int], Ticket] = {}
        self.kv_stores: list[Ticket] = []
        self.prefetch_kv = True
        self.dense: dict[int, Ticket] = {}
        self.hot: dict[int, list[tuple[int, Ticket]]] = {}  # layer -> [(expert, ticket)] prefetched
        self.predicted: dict[int, list[int]] = {}
        self.prev_topk: torch.Tensor | None = None
