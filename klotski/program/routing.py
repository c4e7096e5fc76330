"""The routing an op builder reads: expected (the simulator), live (the runtime) or recorded (replays).

A builder asks four questions, each only once the ops it depends on have been yielded:

* ``tier(layer, e)`` -- where routed expert ``e`` lives: "gpu" | "cpu" | "disk";
* ``hot(layer, source, budget)`` -- the experts to prefetch for MoE layer ``layer`` (at most ``budget``,
  none GPU-resident), predicted once ``source`` (-1: nothing yet) has been routed; ``source`` None: from
  popularity alone (the "wide, early" issue point, before the routing that would refine them);
* ``selected(layer, batch)`` -- after micro-batch ``batch``'s gate: the experts it selects, most tokens first;
* ``tokens(layer, batch)`` -- after the gates: tokens per selected expert over micro-batch ``batch``
  (None: the whole group);
* ``expected(layer, batch, e)`` -- the tokens expert ``e`` is expected to get over the whole group, judged
  after micro-batch ``batch``'s gate (None: before any gate); asked only to place a cold expert on the host
  (:mod:`klotski.program.host`).

:class:`ExpectedRouting` answers from :class:`~klotski.routing_stats.RoutingStats` (the planner's expected
routing of a group); :class:`RecordingView` wraps another view and logs every answer, :class:`ReplayView`
answers from such a log: the runtime's routing, replayed through the builder, gives the ops it ran.
"""
from __future__ import annotations

from typing import Protocol

from klotski.routing_stats import GroupRouting, RoutingStats, expected_routing


class RoutingView(Protocol):
    def tier(self, layer: int, e: int) -> str: ...

    def hot(self, layer: int, source: int | None, budget: int) -> list[int]: ...

    def selected(self, layer: int, batch: int) -> list[int]: ...

    def tokens(self, layer: int, batch: int | None) -> dict[int, int]: ...

    def expected(self, layer: int, batch: int | None, e: int) -> int: ...


class ExpectedRouting:
    """The planner's expected routing: experts ranked by popularity, the ``experts_gpu`` most popular of a
    layer GPU-resident, the next ``experts_cpu`` in host memory, the rest on disk; a batch's selection is
    the cold experts :func:`~klotski.routing_stats.expected_routing` assigns to it."""

    def __init__(self, stats: RoutingStats, placement, shape):
        self.stats, self.placement, self.shape = stats, placement, shape
        self.num_hot: dict[int, int] = {}
        self._cache: dict = {}
        self._ranks: dict = {}
        self._tiers: dict = {}  # layer key -> expert -> tier
        self._layer_tiers: dict = {}  # layer -> its key's tiers (asked millions of times per planner search)

    def _rank(self, layer: int) -> dict[int, int]:
        key = self.stats._layer_key(layer)
        if key not in self._ranks:
            E = self.stats.num_experts
            self._ranks[key] = {int(e): r for r, e in enumerate(self.stats.hot_experts(layer, E))}
        return self._ranks[key]

    def group(self, layer: int) -> GroupRouting:
        E = self.stats.num_experts
        g = self.placement.experts_on("gpu", E)
        hot = min(self.num_hot.get(layer, 0), E - g)
        key = (self.stats._layer_key(layer), g, hot)
        if key not in self._cache:
            self._cache[key] = expected_routing(self.stats, layer, self.shape.tokens_per_batch, self.shape.n, g, hot)
        return self._cache[key]

    def tier(self, layer: int, e: int) -> str:
        tiers = self._layer_tiers.get(layer)
        if tiers is None:
            key = self.stats._layer_key(layer)
            tiers = self._tiers.get(key)
            if tiers is None:  # once per layer key: every expert's tier from its popularity rank
                E = self.stats.num_experts
                g = self.placement.experts_on("gpu", E)
                c = g + self.placement.experts_on("cpu", E)
                tiers = self._tiers[key] = {x: "gpu" if r < g else "cpu" if r < c else "disk"
                                            for x, r in self._rank(layer).items()}
            self._layer_tiers[layer] = tiers
        return tiers[e]

    def hot(self, layer: int, source: int | None, budget: int) -> list[int]:
        self.num_hot[layer] = budget
        r = self.group(layer)
        ranks = self._rank(layer)
        return sorted([e for e, _ in r.hot] + list(r.hot_unused), key=lambda e: ranks[e])[:budget]

    def selected(self, layer: int, batch: int) -> list[int]:
        r = self.group(layer)
        first = [e for e, _ in r.resident + r.hot] if batch == 0 else []
        return first + [e for e, _, b in r.cold if b == batch]

    def tokens(self, layer: int, batch: int | None) -> dict[int, int]:
        r = self.group(layer)
        if batch is None:
            return {e: t for e, t in r.resident + r.hot} | {e: t for e, t, _ in r.cold}
        # one micro-batch: its expected distinct experts share its token-expert assignments; they are spread
        # evenly over the popularity order, so their tiers mix as the layer's do
        k = self.stats.top_k
        per = max(1, r.per_batch)
        total = self.shape.tokens_per_batch * k
        E = self.stats.num_experts
        order = sorted(self._rank(layer), key=self._rank(layer).get)
        ids = [order[(i * E) // per] for i in range(per)]
        return {e: total // per + (1 if i < total % per else 0) for i, e in enumerate(ids)}

    def expected(self, layer: int, batch: int | None, e: int) -> int:
        return self.tokens(layer, None).get(e, 0)


class RecordingView:
    """Answers from ``inner`` and logs each answer under its question, for :class:`ReplayView`."""

    def __init__(self, inner: RoutingView):
        self.inner = inner
        self.log: dict[tuple, object] = {}

    def _ask(self, key: tuple, fn):
        out = fn()
        self.log[key] = out
        return out

    def tier(self, layer, e):
        return self._ask(("tier", layer, e), lambda: self.inner.tier(layer, e))

    def hot(self, layer, source, budget):
        return self._ask(("hot", layer, source, budget), lambda: list(self.inner.hot(layer, source, budget)))

    def selected(self, layer, batch):
        return self._ask(("selected", layer, batch), lambda: list(self.inner.selected(layer, batch)))

    def tokens(self, layer, batch):
        return self._ask(("tokens", layer, batch), lambda: dict(self.inner.tokens(layer, batch)))

    def expected(self, layer, batch, e):
        return self._ask(("expected", layer, batch, e), lambda: int(self.inner.expected(layer, batch, e)))


class ReplayView:
    """The answers a :class:`RecordingView` logged; a question it never saw is an error (the replay then
    diverged from the run)."""

    def __init__(self, log: dict):
        self.log = log

    def _get(self, key: tuple):
        if key not in self.log:
            raise KeyError(f"replay asked {key}, which the recorded run never asked")
        return self.log[key]

    def tier(self, layer, e):
        return self._get(("tier", layer, e))

    def hot(self, layer, source, budget):
        return self._get(("hot", layer, source, budget))

    def selected(self, layer, batch):
        return self._get(("selected", layer, batch))

    def tokens(self, layer, batch):
        return self._get(("tokens", layer, batch))

    def expected(self, layer, batch, e):
        return self._get(("expected", layer, batch, e))
