"""Routing statistics: how many distinct experts T tokens touch at top-k, and the cold-expert queue.

Model: every token picks ``top_k`` distinct experts of a layer by Plackett-Luce sampling from the layer's
popularity weights ``p`` (equivalently: top-k of ``log p + Gumbel noise``). Tokens are independent, so with
``pi_e`` = P(expert e is among one token's top-k) the expected number of distinct experts is exact:

    E[distinct(T)] = sum_e 1 - (1 - pi_e) ** T

``pi`` comes from the weights through the exponential-race form of Plackett-Luce,
``pi_e = int_0^inf p_e exp(-p_e t) P(fewer than k other clocks rang by t) dt`` (numerical quadrature), or
directly from measured counts (``pi_e = count_e / tokens``), in which case weights reproducing them are
fitted so that sampling and the analytic model agree.

Decode steps with batch-aware expert selection (:mod:`klotski.model.expert_selection`, aggressiveness ``a``)
keep every expert that is some token's top-1 and drop a fraction ``a`` of the others. Under Plackett-Luce an
expert is a token's top-1 with probability ``p_e``, so ``t1_e = 1 - (1 - p_e) ** T`` is the chance it is
mandatory and the selected touch probability is modelled per expert as ``t1_e + (1 - a) (t_e - t1_e)``
(never fewer than ``top_k`` experts in all; offload-aware selection leaves the resident and prefetched
experts at ``t_e``). :meth:`RoutingStats.with_selection` returns stats with that model applied.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np


def inclusion_probs(weights: np.ndarray, top_k: int, grid: int = 600) -> np.ndarray:
    """P(expert e in a token's top-k) under Plackett-Luce with ``weights`` [E] (sum normalised to 1)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    num = p.size
    if top_k >= num:
        return np.ones(num)
    if np.allclose(p, p[0]):
        return np.full(num, top_k / num)
    # t grid in log space wide enough that P(others rang) spans 0..1 for every expert
    lo = 1e-4 / p.max()
    hi = 60.0 * top_k / max(p[p > 0].min(), 1e-300) if top_k > 0 else 1.0
    hi = min(hi, 1e6 / p.max())
    t = np.exp(np.linspace(np.log(lo), np.log(hi), grid))  # [G]
    q = -np.expm1(-np.outer(p, t))  # [E, G] P(clock e rang by t)
    # Poisson-binomial counts 0..k-1 of the others: prefix/suffix DPs, leave-one-out by convolution
    k = top_k
    prefix = np.zeros((num + 1, grid, k))
    prefix[0, :, 0] = 1.0
    for e in range(num):
        prev = prefix[e]
        prefix[e + 1] = prev * (1 - q[e])[:, None]
        prefix[e + 1, :, 1:] += prev[:, :-1] * q[e][:, None]
    suffix = np.zeros((num + 1, grid, k))
    suffix[num, :, 0] = 1.0
    for e in range(num - 1, -1, -1):
        nxt = suffix[e + 1]
        suffix[e] = nxt * (1 - q[e])[:, None]
        suffix[e, :, 1:] += nxt[:, :-1] * q[e][:, None]
    below = np.zeros((num, grid))  # P(fewer than k others rang by t)
    for a in range(k):
        below += prefix[:num, :, a] * suffix[1:, :, : k - a].sum(axis=2)
    dens = p[:, None] * np.exp(-np.outer(p, t)) * below * t[None, :]  # integrand in d(log t)
    logt = np.log(t)
    pi = np.sum((dens[:, 1:] + dens[:, :-1]) * 0.5 * np.diff(logt)[None, :], axis=1)
    pi = np.clip(pi, 0.0, 1.0)
    return pi * (top_k / pi.sum())  # remove the small quadrature error (sum pi == k exactly)


def fit_weights(pi: np.ndarray, top_k: int, iters: int = 60) -> np.ndarray:
    """Plackett-Luce weights whose inclusion probabilities are ``pi`` (fixed-point iteration)."""
    target = np.clip(np.asarray(pi, dtype=np.float64), 1e-9, 1 - 1e-9)
    w = target / target.sum()
    for _ in range(iters):
        got = inclusion_probs(w, top_k, grid=300)
        w = w * (target / np.maximum(got, 1e-12)) ** 1.5
        w = w / w.sum()
        if np.max(np.abs(got - target)) < 1e-4:
            break
    return w


@dataclass
class RoutingStats:
    """Per-layer expert popularity of a model: ``weights[layer]`` [E] Plackett-Luce weights.

    Layers not listed use ``default`` (the mean of the listed layers' distributions, or uniform).
    """

    num_experts: int
    top_k: int
    weights: dict[int, np.ndarray] = field(default_factory=dict)
    pis: dict[int, np.ndarray] = field(default_factory=dict)
    source: str = "uniform"
    drop: float = 0.0  # expert selection: fraction of the non-top-1 experts dropped (0: exact routing)
    keeps_free: bool = False  # offload-aware selection: resident / prefetched experts are never dropped

    def with_selection(self, drop: float, keeps_free: bool = False) -> "RoutingStats":
        """These statistics on decode steps under expert selection dropping ``drop`` of the optional experts."""
        if not 0.0 <= drop <= 1.0:
            raise ValueError(f"selection drop fraction must be in [0, 1], got {drop}")
        return replace(self, pis=self.pis, drop=float(drop), keeps_free=bool(keeps_free),
                       source=f"{self.source}+selection({drop:g}{', keeps free' if keeps_free else ''})")

    # ---- constructors -----------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, num_experts: int, top_k: int) -> "RoutingStats":
        return cls(num_experts, top_k, source="uniform")

    @classmethod
    def zipf(cls, num_experts: int, top_k: int, s: float = 1.0, layers: int | None = None,
             seed: int = 0) -> "RoutingStats":
        """Zipf-like popularity ``p_e ~ 1 / rank^s``; with ``layers``, the ranks are shuffled per layer."""
        base = 1.0 / np.arange(1, num_experts + 1) ** s
        stats = cls(num_experts, top_k, source=f"zipf(s={s})")
        rng = np.random.default_rng(seed)
        for layer in range(layers or 1):
            stats.weights[layer] = rng.permutation(base) if layers else base.copy()
        if not layers:
            stats.weights = {-1: base / base.sum()}
        return stats

    @classmethod
    def from_counts(cls, counts: dict[int, list] | list, top_k: int, source: str = "counts") -> "RoutingStats":
        """From measured per-expert assignment counts (``counts[layer][e]``, each token counted k times)."""
        items = counts.items() if isinstance(counts, dict) else enumerate(counts)
        stats = None
        for layer, row in items:
            c = np.asarray(row, dtype=np.float64)
            if stats is None:
                stats = cls(c.size, top_k, source=source)
            if c.size != stats.num_experts:
                raise ValueError(f"routing counts: layer {layer} has {c.size} experts, expected {stats.num_experts}")
            pi = top_k * c / c.sum()
            if pi.max() > 1:
                raise ValueError(f"routing counts: layer {layer} expert {int(pi.argmax())} has more assignments "
                                 f"than tokens ({pi.max():.3f} per token)")
            stats.pis[int(layer)] = pi
            stats.weights[int(layer)] = fit_weights(pi, top_k)
        if stats is None:
            raise ValueError("routing counts: no layers")
        return stats

    @classmethod
    def from_trace_file(cls, path: str | os.PathLike) -> "RoutingStats":
        """From a routing-count JSON (``num_experts``, ``top_k``, ``layers``, ``counts``; e.g. per-expert and cross-layer counts recorded from a real model)."""
        with open(path) as f:
            d = json.load(f)
        for key in ("top_k", "layers", "counts"):
            if key not in d:
                raise ValueError(f"{path}: routing trace missing field {key!r}")
        return cls.from_counts(dict(zip(d["layers"], d["counts"])), int(d["top_k"]), source=os.fspath(path))

    # ---- queries ----------------------------------------------------------------------------------------
    def _layer_key(self, layer: int) -> int | None:
        if layer in self.weights or layer in self.pis:
            return layer
        if -1 in self.weights:
            return -1
        if not self.weights:
            return None
        keys = sorted(self.weights)
        return min(keys, key=lambda k: abs(k - layer))  # nearest measured layer

    def layer_weights(self, layer: int) -> np.ndarray:
        key = self._layer_key(layer)
        if key is None:
            return np.full(self.num_experts, 1.0 / self.num_experts)
        w = self.weights[key]
        return w / w.sum()

    def inclusion(self, layer: int) -> np.ndarray:
        """[E] P(expert e is among one token's top-k) at ``layer``."""
        key = self._layer_key(layer)
        if key is None:
            return np.full(self.num_experts, self.top_k / self.num_experts)
        if key not in self.pis:
            self.pis[key] = inclusion_probs(self.weights[key], self.top_k)
        return self.pis[key]

    def exact_touch_probs(self, tokens: float, layer: int = 0) -> np.ndarray:
        """[E] P(expert e is used by at least one of ``tokens`` tokens) without expert selection."""
        pi = self.inclusion(layer)
        return -np.expm1(tokens * np.log1p(-np.minimum(pi, 1 - 1e-15)))

    def touch_probs(self, tokens: float, layer: int = 0) -> np.ndarray:
        """[E] P(expert e is used by at least one of ``tokens`` tokens), expert selection applied."""
        t = self.exact_touch_probs(tokens, layer)
        if self.drop <= 0.0:
            return t
        p1 = self.layer_weights(layer)
        t1 = np.minimum(-np.expm1(tokens * np.log1p(-np.minimum(p1, 1 - 1e-15))), t)
        optional = t - t1
        floor = min(float(self.top_k), float(t.sum()))  # a token still needs top_k distinct experts
        keep = 1.0 - self.drop
        if optional.sum() > 0 and t1.sum() + keep * optional.sum() < floor:
            keep = (floor - t1.sum()) / optional.sum()
        return t1 + keep * optional

    def expected_distinct(self, tokens: float, layer: int = 0) -> float:
        """Expected number of distinct experts ``tokens`` tokens touch at ``layer``."""
        return float(self.touch_probs(tokens, layer).sum())

    def hot_experts(self, layer: int, count: int) -> np.ndarray:
        """The ``count`` most popular experts at ``layer`` (the static hot set), most popular first."""
        return np.argsort(-self.inclusion(layer), kind="stable")[:count]

    def cold_queue(self, tokens: float, layer: int = 0, num_hot: int | None = None) -> float:
        """Expected number of experts ``tokens`` tokens touch outside the ``num_hot`` hot ones (|Q|)."""
        num_hot = self.top_k if num_hot is None else num_hot
        touched = self.touch_probs(tokens, layer)
        return float(touched.sum() - touched[self.hot_experts(layer, num_hot)].sum())

    def sample(self, tokens: int, layer: int, rng: np.random.Generator) -> np.ndarray:
        """[tokens, top_k] expert ids: Plackett-Luce draws (top-k of log-weights + Gumbel noise)."""
        logw = np.log(np.maximum(self.layer_weights(layer), 1e-300))
        g = logw[None, :] + rng.gumbel(size=(tokens, self.num_experts))
        return np.argpartition(-g, self.top_k - 1, axis=1)[:, : self.top_k]


@dataclass(frozen=True)
class GroupRouting:
    """Representative routing of one layer for a batch group: which experts run, on how many tokens.

    Experts are split into GPU-resident (``resident``), prefetched hot (``hot``) and cold (streamed after
    the gate). ``cold`` lists ``(expert, tokens, first_batch)`` in the order the gates discover them.
    ``per_batch`` is the distinct-expert count of one batch (batch-by-batch policies).
    """

    resident: tuple[tuple[int, int], ...]
    hot: tuple[tuple[int, int], ...]  # prefetched and used
    hot_unused: tuple[int, ...]  # prefetched, not used (loaded, then released)
    cold: tuple[tuple[int, int, int], ...]
    per_batch: int


def expected_routing(stats: RoutingStats, layer: int, tokens_per_batch: int, n: int, num_resident: int,
                     num_hot: int) -> GroupRouting:
    """The expected routing of ``n`` batches of ``tokens_per_batch`` tokens (counts rounded to integers).

    The ``num_resident`` most popular experts are GPU-resident, the next ``num_hot`` prefetched; from each
    set, the expected number of used experts (sum of touch probabilities, rounded) are taken, most likely
    first; tokens are shared among used experts in proportion to their inclusion probability; cold experts
    are assigned to the first batch by which the expected count of distinct cold experts reaches them.
    """
    E, k = stats.num_experts, stats.top_k
    total = tokens_per_batch * n
    order = stats.hot_experts(layer, E)
    pi = stats.inclusion(layer)
    touch = stats.touch_probs(total, layer)
    res, hot, rest = order[:num_resident], order[num_resident:num_resident + num_hot], order[num_resident + num_hot:]
    if stats.drop > 0 and stats.keeps_free:  # offload-aware selection drops none of the resident / hot experts
        free = order[:num_resident + num_hot]
        touch = touch.copy()
        touch[free] = stats.exact_touch_probs(total, layer)[free]

    def used(ids):
        ids = sorted(ids, key=lambda e: -touch[e])
        return ids[: int(round(float(touch[ids].sum())))] if len(ids) else []

    u_res, u_hot, u_cold = used(res), used(hot), used(rest)
    all_used = u_res + u_hot + u_cold
    weight = np.array([pi[e] / max(touch[e], 1e-12) for e in all_used])
    assign = total * k * weight / max(weight.sum(), 1e-12)
    tokens = {e: max(1, int(round(a))) for e, a in zip(all_used, assign)}
    # arrival: the first round(D_cold(j * tokens_per_batch)) cold experts are found by batch j
    cold = []
    if u_cold:
        rest_arr = np.array(rest)
        found = 0
        for j in range(n):
            upto = float(stats.touch_probs(tokens_per_batch * (j + 1), layer)[rest_arr].sum())
            target = len(u_cold) if j == n - 1 else min(len(u_cold), max(found, int(round(upto))))
            for e in u_cold[found:target]:
                cold.append((int(e), tokens[e], j))
            found = target
    per_batch = max(1, int(round(stats.expected_distinct(tokens_per_batch, layer)))) if tokens_per_batch else 0
    return GroupRouting(
        resident=tuple((int(e), tokens[e]) for e in u_res),
        hot=tuple((int(e), tokens[e]) for e in u_hot),
        hot_unused=tuple(int(e) for e in hot if e not in set(u_hot)),
        cold=tuple(cold),
        per_batch=min(per_batch, E),
    )
