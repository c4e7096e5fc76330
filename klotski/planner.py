"""Constraint-sensitive planner: batch size, n and placement that maximise generated tokens per second.

For a policy, the planner searches (batch size, n, KV placement, klotski's prefetch width / flexgen's
overlap) on a coarse grid and then hill-climbs to neighbouring points (klotski's widths: ``top_k`` after the
gates or every expert early; with expert selection on decode steps also the narrower :func:`selection_widths`,
since a selected step needs fewer experts than the router picks). With ``host="search"`` the hill-climb
also chooses host compute per candidate (:mod:`klotski.program.host`: attention per phase on the CPU over a
host KV cache, cold experts on the CPU by the cost rule), starting from the coarse scan's best device-only
point. For each point the weight placement
is filled greedily: everything starts off the GPU, one simulation measures the step's dynamic GPU memory,
then gates, attention, shared experts and finally the most popular experts of every layer become resident
while they fit; what does not fit in pinned CPU memory goes to disk (streamed through a rolling window).
Each candidate is scored by simulating one prefill step and one decode step at the mean KV length:

    tokens/s = batch_size * n * gen_len / (T_prefill + (gen_len - 1) * T_decode)

(when the group's prefill activations do not fit whole, the prefill runs in chunks as the runtime runs it,
:mod:`klotski.prefill_chunks`: T_prefill is then that many passes of one chunk).

and is kept only if the simulated peak memory of every tier stays within its limit.
"""
from __future__ import annotations

from dataclasses import replace

from klotski.costs import ModelCosts
from klotski.plan import RATE_TIE, InfeasibleError, Plan
from klotski.plan_bounds import lean_static_gpu, step_time_lower_bound
from klotski.prefill_chunks import chunk_sizes, num_chunks, prefill_shape
from klotski.routing_stats import RoutingStats
from klotski.schedule import POLICIES, TIERS, Placement, StepShape, static_memory
from klotski.program import order_of
from klotski.planner_host import HostSearch
from klotski.program.host import HostCompute
from klotski.program.pools import kv_staging_buffers, pools_for
from klotski.simulate import SimResult, simulate_model_step
from klotski.units import format_bytes

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GROUP_SIZES = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32)


def selection_widths(top_k: int) -> tuple[int, ...]:
    """Prefetch widths (hot experts per MoE layer) searched besides ``top_k`` when decode steps run expert
    selection: none (every non-resident expert loads after the gate, only those the selection keeps), one,
    and half of ``top_k``. A plain selection drops prefetched experts like any other (loaded for nothing); an
    offload-aware one keeps them (loaded, so used): either way each prefetched expert is a load whatever the
    gate decides, which narrower widths trade against starting the loads before the gate."""
    return tuple(sorted({0, 1, max(1, top_k // 2)} - {top_k}))


class Planner(HostSearch):
    """Plans one model on one machine for a prompt / generation length."""

    def __init__(self, costs: ModelCosts, hw, prompt_len: int, gen_len: int, routing: RoutingStats | None = None,
                 decode_routing: RoutingStats | None = None, host="off", host_experts: bool = True):
        """``decode_routing``: the routing of decode steps when it differs from ``routing`` (expert selection:
        ``routing.with_selection(...)``); None = ``routing``. ``host``: "off" (everything on the device),
        "search" (also search attention per phase on the CPU over a host KV cache, and cold experts on the CPU
        by the rule of :mod:`klotski.program.host`) or a fixed :class:`HostCompute`. ``host_experts``: whether
        the run can compute cold experts on the CPU at all (False: its host copies are int4 / fp8; only
        attention is then searched, and a fixed "auto" plans as "off", as the runtime will run it)."""
        if prompt_len < 1 or gen_len < 1:
            raise ValueError(f"prompt_len and gen_len must be >= 1, got {prompt_len}, {gen_len}")
        self.costs, self.hw = costs, hw
        self.prompt_len, self.gen_len = prompt_len, gen_len
        spec = costs.spec
        self.routing = routing or RoutingStats.uniform(max(spec.num_experts, 1), max(spec.top_k, 1))
        self.decode_routing = decode_routing or self.routing
        self._cache: dict = {}
        self.prune = True  # skip candidates whose tokens/s bound cannot beat the incumbent (same decisions)
        self.kv_tiers = ("gpu", "cpu")  # where the KV cache may live (a caller that fixes it narrows this)
        if not (host in ("off", "search") or isinstance(host, HostCompute)):
            raise ValueError(f"host must be 'off', 'search' or a HostCompute, got {host!r}")
        self.host = host
        self.host_experts = host_experts
        self._host_full = True  # "search": evaluate() searches host compute (off during plan()'s coarse scan)

    # ---- one candidate ----------------------------------------------------------------------------------
    def shapes(self, b: int, n: int, chunk: int | None = None) -> tuple[StepShape, StepShape]:
        """(one prefill pass of ``chunk`` columns (None: the whole prompt), a decode step at the mean KV length)."""
        ctx = self.prompt_len + self.gen_len
        return (prefill_shape(b, n, self.prompt_len, ctx, chunk),
                StepShape("decode", b, n, 1, self.prompt_len + self.gen_len // 2, ctx))

    def simulate(self, policy, placement, b, n, num_hot=None, overlap=True,
                 host: HostCompute | None = None) -> tuple[SimResult, SimResult]:
        """(one prefill pass of the placement's ``prefill_chunk`` columns, one decode step)."""
        policy = order_of(policy, num_hot)  # klotski with its features off runs FlexGen's order
        host = host or HostCompute()
        out = []
        for shape, routing in zip(self.shapes(b, n, placement.prefill_chunk), (self.routing, self.decode_routing)):
            # a phase's step depends on that phase's attention placement only
            phase_host = HostCompute(host.attn(shape.phase), host.attn(shape.phase), host.experts)
            # the placement names the prefill's chunk, which a decode step does not depend on
            placed = placement if shape.phase == "prefill" else replace(placement, prefill_chunk=None)
            key = (policy, placed, b, n, num_hot, overlap, shape.phase) + (
                (phase_host,) if phase_host != HostCompute() else ())
            if key not in self._cache:
                self._cache[key] = simulate_model_step(policy, self.costs, placed, shape, self.hw, routing,
                                                       num_hot=num_hot, overlap=overlap, host=phase_host)
            out.append(self._cache[key])
        return tuple(out)

    def score(self, policy, placement, b, n, num_hot=None, overlap=True, host: HostCompute | None = None) -> Plan:
        host = host or HostCompute()
        pre, dec = self.simulate(policy, placement, b, n, num_hot, overlap, host)
        # a chunked prefill: that many passes through the model
        passes = num_chunks(self.prompt_len, placement.prefill_chunk or self.prompt_len)
        n_eff = 1 if policy in ("layerwise", "resident") else n
        buffers, slots = pools_for(order_of(policy, num_hot), self.costs.spec, placement, num_hot,
                                   overlap and policy != "layerwise")
        steps = self.gen_len - 1
        total = passes * pre.makespan + steps * dec.makespan
        busy = passes * pre.busy.get("compute", 0.0) + steps * dec.busy.get("compute", 0.0)
        peak = {t: max(pre.peak_mem.get(t, 0), dec.peak_mem.get(t, 0)) for t in TIERS}
        return Plan(policy=policy, placement=placement, batch_size=b, n=n_eff, prompt_len=self.prompt_len,
                    gen_len=self.gen_len, tokens_per_s=b * n_eff * self.gen_len / total, prefill_s=passes * pre.makespan,
                    decode_step_s=dec.makespan, bubble_fraction=max(0.0, 1 - busy / total), peak_mem=peak,
                    bytes_per_step=dict(dec.bytes_moved), num_hot=num_hot if policy == "klotski" else None,
                    overlap=overlap, dense_buffers=buffers, expert_slots=slots, hardware=self.hw.name,
                    model=self.costs.name, host=host, extra=self._host_extra(host))

    def fits(self, plan: Plan) -> bool:
        return plan.peak_mem["gpu"] <= self.hw.gpu_memory and plan.peak_mem["cpu"] <= self.hw.cpu_memory

    # ---- placement ----------------------------------------------------------------------------------------
    def place(self, policy, b, n, kv, num_hot=None, overlap=True, host: HostCompute | None = None) -> Placement | None:
        """Greedy weight placement for one candidate, or None when even the leanest does not fit. Over a host KV
        cache the order's own KV staging buffers (klotski: one per micro-batch) when memory allows: when they
        fit and move nothing else off the device (no weight, no GPU-resident expert, no smaller prefill
        chunk) than two would, or their placement is predicted faster all the same; else two."""
        p = self._place(policy, b, n, kv, num_hot, overlap, host)
        if kv != "cpu" or policy == "resident" or kv_staging_buffers(order_of(policy, num_hot), n) <= 2:
            return p
        two = self._place(policy, b, n, kv, num_hot, overlap, host, kv_buffers=2)
        if p is None or two is None or replace(two, kv_buffers=None) == p:
            return p or two
        plans = [self.score(policy, q, b, n, num_hot, overlap, host) for q in (p, two)]
        fits = [plan for plan in plans if self.fits(plan)] or plans
        return max(fits, key=lambda plan: plan.tokens_per_s).placement

    def _place(self, policy, b, n, kv, num_hot=None, overlap=True, host: HostCompute | None = None,
               kv_buffers: int | None = None) -> Placement | None:
        costs, hw = self.costs, self.hw
        spec = costs.spec
        E = spec.num_experts
        moe = [lc for lc in costs.layers if lc.kind == "moe"]
        eb = max((lc.expert_bytes for lc in moe), default=0)
        if policy == "resident":
            p = Placement(kv="gpu", experts_gpu=E)
            return p if self.fits(self.score(policy, p, b, 1)) else None
        # CPU first: what is off the GPU must fit pinned CPU memory, else experts go to disk
        lean = self._cpu_fit(Placement(attn="cpu", gate="cpu", shared="cpu", experts_gpu=0, kv=kv,
                                       kv_buffers=kv_buffers), self.shapes(b, n)[0])  # (the KV and the weights: the same for every chunk)
        if lean is None:
            return None
        for chunk in chunk_sizes(self.prompt_len):  # the whole prompt, else the prefill in chunks, as the runtime
            pre, dec = self.shapes(b, n, chunk)
            static = static_memory(costs, lean, pre, policy)["gpu"]
            if static > hw.gpu_memory:  # the simulated peak is static + dynamic >= static: no need to simulate
                if static_memory(costs, lean, dec, policy)["gpu"] > hw.gpu_memory:
                    return None  # the decode step alone does not fit: chunking the prefill cannot help
                continue
            lean = replace(lean, prefill_chunk=chunk if chunk < self.prompt_len else None)
            pre_sim, dec_sim = self.simulate(policy, lean, b, n, num_hot, overlap, host)
            if dec_sim.peak_mem["gpu"] > hw.gpu_memory:
                return None
            dyn = max(pre_sim.peak_mem["gpu"], dec_sim.peak_mem["gpu"]) - static
            free = hw.gpu_memory - static - dyn
            if free >= 0:
                break
        else:
            return None
        p = lean
        for cls in ("gate", "attn", "shared"):  # small, used by every batch: resident first
            need = costs.device_bytes(sum(getattr(lc, f"{cls}_bytes") for lc in costs.layers))
            if need <= free and getattr(p, cls) != "gpu":
                p, free = replace(p, **{cls: "gpu"}), free - need
        if moe and eb:
            g = min(E, int(free // (len(moe) * costs.device_bytes(eb, expert=True))))
            p = replace(p, experts_gpu=g, experts_cpu=None if p.experts_cpu is None else min(p.experts_cpu, E - g))
        return p

    def _cpu_fit(self, p: Placement, shape: StepShape) -> Placement | None:
        """Move experts (then shared, attention, gates) to disk until the CPU side fits."""
        costs, hw = self.costs, self.hw
        E = costs.spec.num_experts
        moe = [lc for lc in costs.layers if lc.kind == "moe"]
        eb = max((lc.expert_bytes for lc in moe), default=0)
        cpu = static_memory(costs, p, shape, "")["cpu"]
        if cpu <= hw.cpu_memory:
            return p
        if moe and eb:
            # everything but the pinned experts (the staging ring included: experts now go to disk)
            # + M * c * eb for c pinned experts per layer <= limit
            other = static_memory(costs, replace(p, experts_cpu=0), shape, "")["cpu"]
            c = int((hw.cpu_memory - other) // (len(moe) * eb))
            if c >= 0:
                return replace(p, experts_cpu=min(E, c))
        # everything streams from disk
        return replace(p, experts_cpu=0, shared="disk", attn="disk", gate="disk")

    # ---- search -------------------------------------------------------------------------------------------
    def variants(self, policy) -> list[tuple]:
        spec = self.costs.spec
        if policy == "klotski":
            k, E = max(spec.top_k, 1), max(spec.num_experts, 1)
            # paper: K hot after the gates; wide: all experts, early; None: FlexGen's order (features off)
            out = [(k, False), (E, True)]
            if self.decode_routing.drop > 0:  # expert selection: decode needs fewer experts
                out += [(w, False) for w in selection_widths(k) if w != k]
            return out
        if policy == "flexgen":
            return [(None, True), (None, False)]
        return [(None, False)]

    def seed_variants(self, policy, overlap: bool) -> list[tuple]:
        """What a policy also tries at another policy's best point: klotski (and flexgen) in FlexGen's order with
        that point's overlap, so that klotski is never predicted slower than flexgen."""
        return [(None, overlap)] if policy in ("klotski", "flexgen") else []

    def upper_bound(self, policy, b, n, kv, num_hot, overlap) -> float:
        """Tokens/s no placement of this candidate can exceed (``klotski.plan_bounds``; no simulation)."""
        key = ("bound", policy, b, n, kv, num_hot, overlap, self.host_search(policy, kv))
        if key not in self._cache:
            # host compute may take attention, KV copies and experts off the device: bound without them
            relaxed = self.host_search(policy, kv) or self.fixed_host(policy, kv) != HostCompute()
            pre, dec = self.shapes(b, n)
            # a prefill in any chunking (klotski.prefill_chunks) computes as much in all and streams the weights
            # once per pass, at least once, with at most the room a one-column pass's activations leave
            total = 0.0
            for shape, steps, routing, held in ((pre, 1, self.routing, self.shapes(b, n, 1)[0]),
                                                (dec, self.gen_len - 1, self.decode_routing, dec)):
                static = lean_static_gpu(self.costs, held, kv, policy)
                total += steps * step_time_lower_bound(self.costs, self.hw, routing, policy, shape, kv, num_hot,
                                                       static, host_relaxed=relaxed)
            n_eff = 1 if policy in ("layerwise", "resident") else n
            self._cache[key] = b * n_eff * self.gen_len / total if total > 0 else float("inf")
        return self._cache[key]

    def cannot_beat(self, rate: float | None, policy, b, n, kv, num_hot, overlap) -> bool:
        """True when the candidate's tokens/s is certainly <= ``rate`` (None: nothing to beat)."""
        if rate is None or not self.prune:
            return False
        return self.upper_bound(policy, b, n, kv, num_hot, overlap) * (1 + 1e-9) <= rate

    def evaluate(self, policy, b, n, kv, num_hot, overlap) -> Plan | None:
        search = self.host_search(policy, kv)
        key = ("eval+host" if search else "eval", policy, b, n, kv, num_hot, overlap)
        if key not in self._cache:
            if not search:
                host = self.fixed_host(policy, kv)
                p = self.place(policy, b, n, kv, num_hot, overlap, host)
                plan = None if p is None else self.score(policy, p, b, n, num_hot, overlap, host)
                self._cache[key] = plan if plan is not None and self.fits(plan) else None
            else:
                self._cache[key] = self._search_host(policy, b, n, kv, num_hot, overlap)
        return self._cache[key]

    def plan(self, policy: str = "klotski", seeds=None) -> Plan:
        """The best plan for ``policy``; raises :class:`InfeasibleError` when nothing fits.

        ``seeds``: extra (batch size, n, kv tier, overlap) starting points (other policies' best); there klotski
        also tries FlexGen's order (its own features off), so it is never predicted slower than flexgen. None:
        the best points of the policies before ``policy`` in ``POLICIES``, planned first as :meth:`compare` plans
        them, so ``plan(p)`` is ``compare()[p]`` (the plan ``klotski plan`` shows is the one ``LLM`` runs).
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}")
        if seeds is None:
            seeds = [_seed(p) for p in self.compare(POLICIES[:POLICIES.index(policy)]).values() if p is not None]
        self._host_full = self.host != "search"  # "search": the coarse scan places everything on the device
        try:
            return self._plan(policy, seeds)
        finally:
            self._host_full = True

    def _plan(self, policy: str, seeds) -> Plan:
        ns = (1,) if policy in ("layerwise", "resident") else GROUP_SIZES
        kvs = ("gpu",) if policy == "resident" else self.kv_tiers
        best: Plan | None = None
        best_key = None
        coarse_b = [i for i, b in enumerate(BATCH_SIZES) if b in (2, 16, 128)]
        coarse_n = [i for i, n in enumerate(ns) if n in (1, 4, 16)]
        # the seeds are evaluated below anyway: their best rate is a floor for pruning the coarse grid (a
        # candidate strictly below it can never be the search's best, so the same plan is found)
        floor = None
        for b, n, kv, seed_overlap in seeds:
            if b in BATCH_SIZES and kv in kvs:
                extra = self.seed_variants(policy, seed_overlap)
                for hot, overlap in self.variants(policy) + extra:
                    plan = self.evaluate(policy, b, n if n in ns else 1, kv, hot, overlap)
                    if plan is not None and (floor is None or plan.tokens_per_s > floor):
                        floor = plan.tokens_per_s

        def rate():
            if best is None:
                return floor
            return best.tokens_per_s if floor is None else max(floor, best.tokens_per_s)

        for kv in kvs:
            for hot, overlap in self.variants(policy):
                for ni in coarse_n:
                    # bound-pruned batch sizes of this run; the scan stops at the first infeasible one, so
                    # their feasibility is settled (simulated) only before a later batch size is taken
                    skipped: list[int] = []
                    for bi in coarse_b:
                        n = ns[ni]
                        if self.cannot_beat(rate(), policy, BATCH_SIZES[bi], n, kv, hot, overlap) and (
                                bi != coarse_b[0] or self.cannot_beat(rate(), policy, BATCH_SIZES[0], n, kv, hot,
                                                                      overlap)):
                            skipped.append(bi)
                            continue
                        plan = self.evaluate(policy, BATCH_SIZES[bi], n, kv, hot, overlap)
                        if plan is None:
                            if bi == coarse_b[0]:  # nothing this small fits: try the smallest batch
                                plan = self.evaluate(policy, BATCH_SIZES[0], n, kv, hot, overlap)
                            if plan is None:
                                break  # larger batches need more memory still
                        if plan.beats(best):
                            if any(self._stops_scan(policy, i, coarse_b[0], n, kv, hot, overlap) for i in skipped):
                                break
                            best, best_key = plan, (bi, ni, kv, hot, overlap)
        for b, n, kv, seed_overlap in seeds:
            if b not in BATCH_SIZES or kv not in kvs:
                continue
            n = n if n in ns else 1
            extra = self.seed_variants(policy, seed_overlap)
            for hot, overlap in self.variants(policy) + extra:
                if self.cannot_beat(rate(), policy, b, n, kv, hot, overlap):
                    continue
                plan = self.evaluate(policy, b, n, kv, hot, overlap)
                if plan is not None and plan.beats(best):
                    best, best_key = plan, (BATCH_SIZES.index(b), ns.index(n), kv, hot, overlap)
        if best is None:
            raise self.infeasible(policy)
        best, best_key = self._climb(policy, ns, kvs, best, best_key)
        if self.host == "search" and not self._host_full:  # then climb again, searching host compute too
            self._host_full = True
            best = self.evaluate(policy, BATCH_SIZES[best_key[0]], ns[best_key[1]], *best_key[2:]) or best
            best, best_key = self._climb(policy, ns, kvs, best, best_key)
        return best

    def _climb(self, policy, ns, kvs, best: Plan, best_key: tuple) -> tuple[Plan, tuple]:
        """Hill-climb over neighbouring batch sizes (x2), group sizes, KV tiers and variants."""
        improved = True
        while improved:
            improved = False
            bi, ni, kv, hot, overlap = best_key
            cands = [(bi + db, ni + dn, kv, hot, overlap) for db in (-1, 0, 1) for dn in (-1, 0, 1)]
            cands += [(bi, ni, k2, h2, o2) for k2 in kvs for h2, o2 in self.variants(policy)]
            for c in cands:
                if not (0 <= c[0] < len(BATCH_SIZES) and 0 <= c[1] < len(ns)) or c == best_key:
                    continue
                if self.cannot_beat(best.tokens_per_s * (1 + RATE_TIE), policy, BATCH_SIZES[c[0]], ns[c[1]], *c[2:]):
                    continue
                plan = self.evaluate(policy, BATCH_SIZES[c[0]], ns[c[1]], *c[2:])
                if plan is not None and plan.beats(best):
                    best, best_key, improved = plan, c, True
        return best, best_key

    def _stops_scan(self, policy, bi, first_bi, n, kv, hot, overlap) -> bool:
        """Whether the unpruned coarse scan would have stopped at the skipped batch size ``BATCH_SIZES[bi]``."""
        if self.evaluate(policy, BATCH_SIZES[bi], n, kv, hot, overlap) is not None:
            return False
        return bi != first_bi or self.evaluate(policy, BATCH_SIZES[0], n, kv, hot, overlap) is None

    def compare(self, policies=POLICIES) -> dict[str, Plan | None]:
        out, seeds = {}, []
        for policy in policies:  # each policy's search also starts from the earlier policies' best points
            try:
                out[policy] = self.plan(policy, seeds)
                seeds.append(_seed(out[policy]))
            except InfeasibleError:
                out[policy] = None
        return out

    # ---- errors -------------------------------------------------------------------------------------------
    def min_memory(self, policy: str = "klotski") -> tuple[int, int]:
        """(GPU, CPU) bytes the leanest plan needs: batch 1, n 1, every weight streamed from disk."""
        p = Placement(attn="disk", gate="disk", shared="disk", experts_gpu=0, experts_cpu=0, kv="cpu")
        pol = "klotski" if policy == "resident" else policy
        pre, dec = self.simulate(pol, p, 1, 1, None if pol != "klotski" else self.costs.spec.top_k, False)
        gpu = max(pre.peak_mem["gpu"], dec.peak_mem["gpu"])
        cpu = max(pre.peak_mem["cpu"], dec.peak_mem["cpu"])
        if policy == "resident":
            gpu = static_memory(self.costs, Placement(experts_gpu=self.costs.spec.num_experts),
                                self.shapes(1, 1)[0], policy)["gpu"]
            cpu = 0
        return gpu, cpu

    def infeasible(self, policy: str) -> InfeasibleError:
        gpu, cpu = self.min_memory(policy)
        return InfeasibleError(
            f"no {policy} plan for {self.costs.name} fits GPU {format_bytes(self.hw.gpu_memory)} / CPU "
            f"{format_bytes(self.hw.cpu_memory)} (prompt {self.prompt_len}, generate {self.gen_len}); the smallest "
            f"plan (batch 1, weights streamed from disk) needs GPU >= {format_bytes(gpu)} and CPU >= "
            f"{format_bytes(cpu)}", min_gpu_memory=gpu, min_cpu_memory=cpu)


def _seed(plan: Plan) -> tuple:
    """A plan's point as a starting point of another policy's search: (batch size, n, kv tier, overlap)."""
    return plan.batch_size, plan.n, plan.placement.kv, plan.overlap


def plan(costs: ModelCosts, hw, prompt_len: int, gen_len: int, policy: str = "klotski",
         routing: RoutingStats | None = None) -> Plan:
    """Convenience: ``Planner(costs, hw, prompt_len, gen_len, routing).plan(policy)``."""
    return Planner(costs, hw, prompt_len, gen_len, routing).plan(policy)
