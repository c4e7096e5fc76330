"""Next-layer expert prediction: gate lookahead, the correlation table, and a per-layer choice between them.

*Gate lookahead*: the residual stream changes little from one layer to the next, so applying MoE layer
``m``'s own post-attention RMSNorm and router to the residual stream of an earlier layer ``l`` (the rows
entering layer ``l``'s MLP) predicts which experts ``m``'s gate will pick, before layer ``l``'s experts
and layer ``m``'s attention have run. It needs only ``m``'s norm and router weights ([H] + [E, H] per MoE
layer, kept resident by :class:`GateLookahead`).

:class:`ExpertPredictor` holds both predictors. For every prediction it ranks the experts both ways and,
when the layer's true routing is observed, scores both rankings at the budget that was asked for; each layer
then uses whichever source has the higher measured recall so far (lookahead until measured, or when only one exists).
``hit_rate()`` is the measured recall of the chosen predictions (the fraction of experts a group used that
were predicted): the planner's expected prefetch hit rate can come from it.

Integration point for an offloaded runtime (one call per MoE layer, one observation per MoE layer)::

    predictor = ExpertPredictor.from_weights(weights, table=prefetcher, device=device)
    # after layer l's gates ran for all tokens of the group: topk_ids [T, k] and the residual stream rows
    # entering layer l's MLP, resid [T, H] (``st.x.reshape(-1, H).index_select(0, rows)``)
    hot = predictor.predict_next(l, resid, topk_ids, budget, exclude=experts_resident_on_device)
    # -> up to ``budget`` expert ids of layer predictor.next_moe(l), most likely first; load them early
    # when layer m's gate has run on the same tokens (where the runtime records routing today):
    predictor.observe(m, topk_ids_m)      # learns the correlation table too (replaces prefetcher.record)
    predictor.reset_sequence()            # with the table's, at the start of each forward

Two places to call ``predict_next`` for layer ``m`` = ``next_moe(l)``, same call, different ``hidden_states``:
right after layer ``l``'s gate with the residual entering ``l``'s MLP (the load then overlaps ``l``'s
experts and ``m``'s attention), or after ``l``'s experts with ``l``'s output rows (more accurate: the
state ``m``'s router sees differs from it by ``m``'s attention only; the load overlaps ``m``'s attention
only). ``bench/quality/eval_prefetch.py`` measures both on the trained demo model.

``predict_next(-1, None, None, budget)`` predicts the first MoE layer (popularity, from the table).
Prediction changes only what is loaded early, never which experts compute: tokens are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from klotski.model.layers import rms_norm
from klotski.model.router import router_logits, select
from klotski.model.spec import ModelSpec
from klotski.prefetch import CorrelationPrefetcher

SOURCES = ("table", "lookahead")


def rank_experts(scores: np.ndarray, exclude=()) -> list[int]:
    """Experts by score, highest first (ties: lower id first), without ``exclude``."""
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    skip = set(int(e) for e in exclude)
    return [int(e) for e in order if int(e) not in skip]


class GateLookahead:
    """Each MoE layer's post-attention norm and router, applied to an earlier layer's residual stream."""

    def __init__(self, spec: ModelSpec, gates: dict[int, dict[str, torch.Tensor]]):
        missing = [m for m in spec.moe_layers if m not in gates]
        if missing:
            raise ValueError(f"gate lookahead needs the norm and router of every MoE layer; missing layers {missing}")
        for m, w in gates.items():
            if tuple(w["router"].shape) != (spec.num_experts, spec.hidden_size):
                raise ValueError(f"layer {m} router is {list(w['router'].shape)}, expected "
                                 f"[{spec.num_experts}, {spec.hidden_size}]")
        self.spec = spec
        self.gates = gates

    @classmethod
    def from_weights(cls, weights, device=None, dtype: torch.dtype = torch.float32) -> "GateLookahead":
        """Read ``post_attn_norm``, ``router`` (and ``router_bias``) of every MoE layer of a
        :class:`~klotski.model.weights.CheckpointWeights` (only those tensors' bytes)."""
        gates = {}
        for m in weights.spec.moe_layers:
            src = weights.layers[m]
            w = {k: weights.read_source(src[k]) for k in ("post_attn_norm", "router", "router_bias") if k in src}
            gates[m] = {k: v.to(device=device, dtype=torch.float32 if k == "router_bias" else dtype)
                        for k, v in w.items()}
        return cls(weights.spec, gates)

    def route(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s routing of residual rows hidden_states [T, H] -> (topk_weights [T, k],
        topk_ids [T, k], probs [T, E] fp32: softmax or sigmoid scores)."""
        if layer not in self.gates:
            raise ValueError(f"layer {layer} is not a MoE layer (MoE layers: {self.spec.moe_layers})")
        w = self.gates[layer]
        if hidden_states.ndim != 2 or hidden_states.shape[1] != self.spec.hidden_size:
            raise ValueError(f"hidden_states must be [T, {self.spec.hidden_size}], got {list(hidden_states.shape)}")
        x = hidden_states.to(device=w["router"].device, dtype=w["router"].dtype)
        logits = router_logits(self.spec, w, rms_norm(x, w["post_attn_norm"], self.spec.rms_norm_eps))
        topk_weights, topk_ids = select(self.spec, logits, w.get("router_bias"))
        probs = torch.sigmoid(logits.float()) if self.spec.router_scoring == "sigmoid" else torch.softmax(
            logits.float(), dim=-1)
        return topk_weights, topk_ids, probs

    def scores(self, layer: int, hidden_states: torch.Tensor) -> np.ndarray:
        """[E]: how many of the T tokens would pick each expert, plus the mean score (< 1) to order ties."""
        _, ids, probs = self.route(layer, hidden_states)
        counts = torch.bincount(ids.reshape(-1).cpu(), minlength=self.spec.num_experts).double()
        return (counts + probs.mean(0).cpu().double() / 2).numpy()

    def predict(self, layer: int, hidden_states: torch.Tensor, budget: int) -> list[int]:
        return rank_experts(self.scores(layer, hidden_states))[: max(0, budget)]


@dataclass
class HitCounts:
    """One layer's record for one source: predictions made, experts predicted, of those used, experts used."""
    predictions: int = 0
    predicted: int = 0
    hits: int = 0
    used: int = 0

    def add(self, predicted: list[int], used: set[int]) -> None:
        self.predictions += 1
        self.predicted += len(predicted)
        self.hits += len(used.intersection(predicted))
        self.used += len(used)

    @property
    def recall(self) -> float:
        return self.hits / self.used if self.used else 0.0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0


@dataclass
class _Pending:
    rankings: dict[str, list[int]]
    budget: int
    exclude: frozenset[int]
    chosen: str


class ExpertPredictor:
    """Correlation table + gate lookahead; per layer, the source measured to hit more (see module doc)."""

    def __init__(self, spec: ModelSpec, table: CorrelationPrefetcher | None = None,
                 lookahead: GateLookahead | None = None):
        if table is None and lookahead is None:
            raise ValueError("an expert predictor needs a correlation table, a gate lookahead, or both")
        if table is not None and (table.num_layers, table.num_experts) != (spec.num_layers, spec.num_experts):
            raise ValueError(f"correlation table is {table.num_layers} layers x {table.num_experts} experts, "
                             f"model has {spec.num_layers} x {spec.num_experts}")
        self.spec = spec
        self.table = table
        self.lookahead = lookahead
        moe = spec.moe_layers
        self._next = {layer: next((m for m in moe if m > layer), None) for layer in range(-1, spec.num_layers)}
        self.counts = {m: {s: HitCounts() for s in (*SOURCES, "chosen")} for m in moe}
        self._pending: dict[int, _Pending] = {}

    @classmethod
    def from_weights(cls, weights, table: CorrelationPrefetcher | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> "ExpertPredictor":
        spec = weights.spec
        table = table if table is not None else CorrelationPrefetcher(spec.num_layers, spec.num_experts)
        return cls(spec, table, GateLookahead.from_weights(weights, device, dtype))

    def next_moe(self, layer: int) -> int | None:
        """The MoE layer ``predict_next(layer, ...)`` predicts (None after the last)."""
        if layer not in self._next:
            raise ValueError(f"layer {layer} out of range [-1, {self.spec.num_layers})")
        return self._next[layer]

    def source(self, layer: int) -> str:
        """The source layer ``layer``'s predictions come from: the higher measured recall so far (ties and
        no measurement yet: lookahead)."""
        if self.lookahead is None:
            return "table"
        if self.table is None:
            return "lookahead"
        c = self.counts[layer]
        return "table" if c["table"].recall > c["lookahead"].recall else "lookahead"

    def predict_next(self, layer: int, hidden_states: torch.Tensor | None, prev_topk_ids=None,
                     budget: int = 1, exclude=()) -> list[int]:
        """Up to ``budget`` experts of MoE layer ``next_moe(layer)``, most likely first, none of ``exclude``.

        hidden_states [T, H]: the residual stream rows entering layer ``layer``'s MLP (None: no lookahead);
        prev_topk_ids [T, k]: layer ``layer``'s routing of the same tokens (None: popularity)."""
        target = self.next_moe(layer)
        if target is None or budget <= 0:
            return []
        rankings = {}
        if self.table is not None:
            rankings["table"] = rank_experts(self.table.scores(target, prev_topk_ids), exclude)
        if self.lookahead is not None and hidden_states is not None and hidden_states.shape[0] > 0:
            rankings["lookahead"] = rank_experts(self.lookahead.scores(target, hidden_states), exclude)
        chosen = self.source(target)
        if chosen not in rankings:
            chosen = next(iter(rankings))
        self._pending[target] = _Pending(rankings, budget, frozenset(int(e) for e in exclude), chosen)
        return rankings[chosen][:budget]

    def observe(self, layer: int, topk_ids) -> None:
        """Layer ``layer``'s true routing [T, k]: learn the table, score the pending prediction's sources."""
        if self.table is not None:
            self.table.record(layer, topk_ids)
        pending = self._pending.pop(layer, None)
        if pending is None:
            return
        ids = topk_ids.detach().cpu().reshape(-1).tolist() if isinstance(topk_ids, torch.Tensor) else \
            np.asarray(topk_ids).reshape(-1).tolist()
        used = {int(e) for e in ids} - pending.exclude
        for source, ranking in pending.rankings.items():
            self.counts[layer][source].add(ranking[: pending.budget], used)
        self.counts[layer]["chosen"].add(pending.rankings[pending.chosen][: pending.budget], used)

    def reset_sequence(self) -> None:
        """A new group of tokens starts (forget unobserved predictions and the table's last record)."""
        self._pending.clear()
        if self.table is not None:
            self.table.reset_sequence()

    def hit_rate(self, layer: int | None = None, source: str = "chosen") -> float:
        """Measured recall of ``source``'s predictions ("chosen", "table" or "lookahead") at one MoE layer,
        or pooled over all MoE layers; 0.0 before any observation."""
        if source not in (*SOURCES, "chosen"):
            raise ValueError(f"source must be one of {(*SOURCES, 'chosen')}, got {source!r}")
        layers = self.spec.moe_layers if layer is None else [layer]
        hits = sum(self.counts[m][source].hits for m in layers)
        used = sum(self.counts[m][source].used for m in layers)
        return hits / used if used else 0.0

    def summary(self) -> dict:
        """Per MoE layer: the chosen source and each source's predictions, precision and recall."""
        return {m: {"source": self.source(m),
                    **{s: {"predictions": c.predictions, "precision": c.precision, "recall": c.recall}
                       for s, c in self.counts[m].items()}}
                for m in self.spec.moe_layers}
