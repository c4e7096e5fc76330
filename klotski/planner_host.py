"""The planner's search over host compute (:mod:`klotski.program.host`): which candidates search it, the fixed
choice of the others, and per candidate the cold-expert mode and each phase's attention placement.

A mixin of :class:`klotski.planner.Planner` (it uses the planner's ``place``, ``simulate``, ``score`` and
``fits``); one module so that the planner's grid search and climb read apart from where compute runs.
"""
from __future__ import annotations

from klotski.plan import Plan
from klotski.program.host import ExpertRule, HostCompute


class HostSearch:
    host: object  # "off" | "search" | HostCompute (set by Planner.__init__)
    host_experts: bool  # whether cold experts can run on the CPU at all (not with int4 / fp8 host copies)
    _host_full: bool

    def host_search(self, policy: str, kv: str) -> bool:
        """Whether evaluate() searches host compute for this candidate (never for ``resident``)."""
        return self.host == "search" and self._host_full and policy != "resident"

    def fixed_host(self, policy: str, kv: str) -> HostCompute:
        """The one host-compute choice of a candidate when not searching (CPU attention needs a host KV)."""
        h = self.host if isinstance(self.host, HostCompute) and policy != "resident" else HostCompute()
        if h.experts == "auto" and not self.host_experts:  # the runtime runs "auto" as "off" then
            h = HostCompute(h.prefill_attn, h.decode_attn, "off")
        return h if kv == "cpu" else HostCompute(experts=h.experts)

    def _host_extra(self, host: HostCompute) -> dict:
        """The rule's threshold for the plan's description (the largest MoE layer's, "auto" only)."""
        if host.experts != "auto" or not self.costs.spec.moe_layers:
            return {}
        rule = ExpertRule(self.costs, self.hw)
        return {"cpu_expert_max_tokens": max(rule.max_cpu_tokens(i) for i in self.costs.spec.moe_layers)}

    def _search_host(self, policy, b, n, kv, num_hot, overlap) -> Plan | None:
        """The best host compute of a candidate: per cold-expert mode ("off", "auto"), the weights are placed
        with attention on the device (it needs the most device memory: KV staging), then each phase takes the
        attention placement that makes its step shortest (a phase's step depends on its own placement only).
        When the KV staging of attention on the device does not fit, the weights are placed with decode's (then
        also prefill's) attention on the CPU (no staging), and that phase keeps it."""
        best = None
        attns = ("gpu", "cpu") if kv == "cpu" else ("gpu",)
        # where the weights are placed from: attention on the device, else (its KV staging does not fit) decode's,
        # then also prefill's, on the CPU
        bases = [("gpu", "gpu")] + ([("gpu", "cpu"), ("cpu", "cpu")] if kv == "cpu" else [])
        for experts in ("off", "auto") if self.host_experts else ("off",):
            for attn in bases:
                base = HostCompute(*attn, experts)
                p = self.place(policy, b, n, kv, num_hot, overlap, base)
                if p is not None:
                    break
            if p is None:
                continue
            pick = []
            for phase in (0, 1):  # prefill, decode
                options = attns if attn[phase] == "gpu" else ("cpu",)
                times = {a: self.simulate(policy, p, b, n, num_hot, overlap, HostCompute(a, a, experts))[phase]
                         for a in options}
                pick.append(min(options, key=lambda a: (times[a].makespan, a != "gpu")))
            for host in dict.fromkeys((HostCompute(pick[0], pick[1], experts), base)):
                plan = self.score(policy, p, b, n, num_hot, overlap, host)
                if self.fits(plan):
                    if plan.beats(best):
                        best = plan
                    break
        return best
