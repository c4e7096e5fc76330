"""Batch-aware expert selection on decode steps (after Lynx, arXiv 2411.08982), optionally offload-aware.

During decode a batch of a few dozen tokens touches nearly every expert of a layer, although each token
depends mostly on its top-1 expert. Selection remaps a token's low-confidence assignments onto experts the
batch needs anyway, so fewer distinct experts run (and, offloaded, fewer load). Rules, for every call:

* every token keeps its top-1 expert (the router's best-ranked one) and still gets exactly ``top_k``
  distinct experts;
* the set of distinct experts of the batch never grows (new ids are a subset of the old ones);
* weights are recomputed from the router's scores the way the router computes them (softmax probabilities,
  renormalised over the k chosen when the model does; sigmoid scores for DeepSeek-V3, renormalised (+1e-20)
  when ``norm_topk_prob``; times ``routed_scaling_factor``); tokens that keep their experts keep their
  weights bit for bit;
* deterministic: ties break towards the lower expert id;
* ``aggressiveness`` 0 (or mode "off", the default) returns the router's output unchanged.

Confidence of an assignment (token t, expert e): its gap to the token's top-1 in the router's log domain,
``gap = a[t, e] - a[t, top1]`` with ``a`` the router logits for softmax routers (the log ratio of the two
softmax weights) and ``log(sigmoid(logit))`` for sigmoid routers (the log ratio of the two output weights).
Assignments are binned by gap (bins of ``bin_width`` nats, the last one open); an assignment in bin ``b``
adds ``exp(-(b + 1/2) * bin_width)`` to its expert's batch score, a top-1 assignment adds 1. Experts that are
some token's top-1 are always kept. Of the others ("droppable"), the ``round(aggressiveness * count)`` with
the lowest batch scores are dropped (ties: higher id first), never so many that fewer than ``top_k`` experts
remain. Each assignment to a dropped expert moves to the token's best-ranked active expert it does not
already use (within the router's allowed groups for grouped routers); a token that cannot be refilled
(too few active experts in its groups) keeps its original experts.

Offload-aware mode ("lynx-offload"): experts marked ``free`` (device-resident, already loading, or already
chosen by an earlier micro-batch of the same step) are never dropped, so every dropped expert is a load
avoided and remapped assignments land on experts that cost no load. On an engine where every expert is
resident it changes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from klotski.model.router import group_mask, sanitize
from klotski.model.spec import ModelSpec

MODES = ("off", "lynx", "lynx-offload")


@dataclass(frozen=True)
class ExpertSelection:
    """What ``LLM(..., expert_selection=...)`` asks for: ``"off"``, ``"lynx:A"`` or ``"lynx-offload:A"`` with
    aggressiveness ``A`` in [0, 1] (the fraction of droppable experts dropped per batch)."""

    mode: str = "off"
    aggressiveness: float = 0.0
    bin_width: float = 0.5  # nats of router log-domain gap per confidence bin
    num_bins: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"expert_selection mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.aggressiveness, (int, float)) and 0.0 <= float(self.aggressiveness) <= 1.0):
            raise ValueError(f"expert_selection aggressiveness must be a number in [0, 1], got {self.aggressiveness!r}")
        if not self.bin_width > 0 or self.num_bins < 1:
            raise ValueError(f"expert_selection needs bin_width > 0 and num_bins >= 1, got {self.bin_width}, "
                             f"{self.num_bins}")

    @classmethod
    def parse(cls, value) -> "ExpertSelection":
        """None / "off" / "lynx:0.5" / "lynx-offload:0.5" / an ExpertSelection -> ExpertSelection."""
        if value is None:
            return cls()
        if isinstance(value, ExpertSelection):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expert_selection must be a string like 'off', 'lynx:0.5' or 'lynx-offload:0.5', "
                             f"got {type(value).__name__} {value!r}")
        text = value.strip().lower()
        if text == "off":
            return cls()
        mode, sep, amount = text.partition(":")
        if mode not in MODES[1:] or not sep:
            raise ValueError(f"expert_selection {value!r} not understood: expected 'off', 'lynx:A' or "
                             f"'lynx-offload:A' with aggressiveness A in [0, 1]")
        try:
            a = float(amount)
        except ValueError:
            raise ValueError(f"expert_selection {value!r}: aggressiveness {amount!r} is not a number in [0, 1]") from None
        if not 0.0 <= a <= 1.0:  # also refuses nan
            raise ValueError(f"expert_selection {value!r}: aggressiveness must be in [0, 1], got {a}")
        return cls(mode, a)

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.aggressiveness > 0

    @property
    def measured(self) -> bool:
        """Whether decode steps go through selection and its counters (``"lynx:0"``: exact routing, counted)."""
        return self.mode != "off"

    @property
    def offload_aware(self) -> bool:
        return self.mode == "lynx-offload"

    def __str__(self) -> str:
        return "off" if self.mode == "off" else f"{self.mode}:{self.aggressiveness:g}"


@dataclass
class Selected:
    """One call's result: topk_weights [T, k] fp32, topk_ids [T, k] int64, and what changed."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    remapped: int  # token-expert assignments moved to another expert
    distinct_before: int
    distinct_after: int
    exact_ids: torch.Tensor | None = None  # the router's topk_ids [T, k] before selection


def router_scores(spec: ModelSpec, logits: torch.Tensor, bias: torch.Tensor | None = None):
    """logits [T, E] -> (confidence [T, E] log-domain affinities, choice [T, E] the router's ranking scores,
    -inf outside a token's allowed groups)."""
    logits = sanitize(logits).float()
    if spec.router_scoring == "softmax":
        choice = logits
        if spec.topk_method == "group_limited_greedy" and spec.n_group > 1:
            keep = group_mask(torch.softmax(logits, dim=-1), spec.n_group, spec.topk_group, "max")
            choice = logits.masked_fill(~keep, float("-inf"))
        return logits, choice
    if spec.router_scoring == "sigmoid":
        choice = torch.sigmoid(logits)
        if bias is not None:
            choice = choice + bias.float()
        if spec.topk_method == "noaux_tc" and spec.n_group > 1:
            choice = choice.masked_fill(~group_mask(choice, spec.n_group, spec.topk_group, "top2"), float("-inf"))
        return F.logsigmoid(logits), choice
    raise ValueError(f"expert selection: router scoring {spec.router_scoring!r} is not supported")


def router_weights(spec: ModelSpec, logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The router's weights for the given ids: logits [T, E], topk_ids [T, k] -> [T, k] fp32."""
    logits = sanitize(logits).float()
    if spec.router_scoring == "softmax":
        w = torch.softmax(logits, dim=-1).gather(1, topk_ids)
        if spec.norm_topk_prob and spec.topk_method == "greedy":
            w = w / w.sum(dim=-1, keepdim=True)
    else:
        w = torch.sigmoid(logits).gather(1, topk_ids)
        if spec.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    if spec.routed_scaling_factor != 1.0:
        w = w * spec.routed_scaling_factor
    return w


def expert_scores(conf: torch.Tensor, choice: torch.Tensor, topk_ids: torch.Tensor, sel: ExpertSelection):
    """Batch score per expert from binned confidence gaps -> (scores [E] fp32, top1 [T] expert ids)."""
    T, E = conf.shape
    ranked = choice.gather(1, topk_ids)
    top1_col = ranked.argmax(dim=1)  # first maximal column: the router's own top-1 on sorted output
    top1 = topk_ids.gather(1, top1_col[:, None]).squeeze(1)
    gap = (conf.gather(1, topk_ids) - conf.gather(1, top1[:, None])).clamp(max=0.0)
    bins = torch.clamp(torch.floor(-gap / sel.bin_width), max=sel.num_bins - 1)
    contrib = torch.exp(-(bins + 0.5) * sel.bin_width)
    is_top1 = torch.zeros_like(gap, dtype=torch.bool).scatter_(1, top1_col[:, None], True)
    contrib = torch.where(is_top1, torch.ones_like(contrib), contrib)
    scores = torch.zeros(E, dtype=torch.float32, device=conf.device).index_add_(0, topk_ids.reshape(-1),
                                                                                contrib.reshape(-1))
    return scores, top1


def drop_set(scores: torch.Tensor, used: torch.Tensor, mandatory: torch.Tensor, free: torch.Tensor | None,
             aggressiveness: float, top_k: int) -> torch.Tensor:
    """Bool [E]: the experts to drop. ``used`` / ``mandatory`` / ``free`` bool [E]."""
    droppable = used & ~mandatory
    if free is not None:
        droppable &= ~free
    count = int(droppable.sum())
    n_drop = min(int(math.floor(aggressiveness * count + 0.5)), int(used.sum()) - top_k)
    drop = torch.zeros_like(used)
    if n_drop <= 0:
        return drop
    ids = droppable.nonzero().squeeze(1).tolist()
    order = sorted(ids, key=lambda e: (float(scores[e]), -e))  # lowest score first; ties: higher id first
    drop[order[:n_drop]] = True
    return drop


def remap(choice: torch.Tensor, topk_ids: torch.Tensor, drop: torch.Tensor):
    """Move assignments to dropped experts onto each token's best active expert it does not use yet.
    -> (new_ids [T, k], changed [T] bool); rows that cannot be refilled keep their ids."""
    T, E = choice.shape
    used = torch.zeros(E, dtype=torch.bool, device=choice.device)
    used[topk_ids.reshape(-1)] = True
    active = used & ~drop
    moved = drop[topk_ids]  # [T, k]
    has = torch.zeros(T, E, dtype=torch.bool, device=choice.device).scatter_(1, topk_ids, True)
    cand = choice.masked_fill(~active[None, :] | has, float("-inf"))
    # descending by score, ties -> lower id first (stable sort on the negated score)
    order = torch.sort(-cand, dim=1, stable=True).indices
    rank = (torch.cumsum(moved.long(), dim=1) - 1).clamp(min=0)
    fill = order.gather(1, rank)
    ok = torch.isfinite(cand.gather(1, fill)) | ~moved
    changed = moved.any(dim=1) & ok.all(dim=1)
    new_ids = torch.where(moved & changed[:, None], fill, topk_ids)
    # keep the router's convention: columns by descending ranking score (top-1 first), ties by column
    keys = choice.gather(1, new_ids)
    cols = torch.sort(-keys, dim=1, stable=True).indices
    new_ids = torch.where(changed[:, None], new_ids.gather(1, cols), topk_ids)
    return new_ids, changed


def select_experts(spec: ModelSpec, logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   sel: ExpertSelection, free: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> Selected:
    """Apply ``sel`` to one batch of a decode step.

    logits [T, E] (router logits), topk_weights [T, k] fp32 / topk_ids [T, k] (the router's output on them),
    ``free`` bool [E] (offload-aware mode: experts that cost no load), ``bias`` [E] (DeepSeek-V3's
    e_score_correction_bias). Returns :class:`Selected`; with selection off the inputs come back as they are.
    """
    T, k = topk_ids.shape
    if logits.dim() != 2 or logits.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"select_experts: logits [T, E] and topk_weights/topk_ids [T, k] must agree, got "
                         f"{list(logits.shape)}, {list(topk_weights.shape)}, {list(topk_ids.shape)}")
    E = logits.shape[1]
    ids = topk_ids.long()
    distinct = int(torch.unique(ids).numel()) if T else 0
    if not sel.enabled or T == 0 or k >= E:
        return Selected(topk_weights, topk_ids, 0, distinct, distinct, topk_ids)
    if free is not None and free.shape != (E,):
        raise ValueError(f"select_experts: free must be a bool mask [{E}], got {list(free.shape)}")
    conf, choice = router_scores(spec, logits, bias)
    scores, top1 = expert_scores(conf, choice, ids, sel)
    used = torch.zeros(E, dtype=torch.bool, device=ids.device)
    used[ids.reshape(-1)] = True
    mandatory = torch.zeros_like(used)
    mandatory[top1] = True
    drop = drop_set(scores, used, mandatory, free.to(ids.device) if sel.offload_aware and free is not None else None,
                    sel.aggressiveness, k)
    if not drop.any():
        return Selected(topk_weights, topk_ids, 0, distinct, distinct, topk_ids)
    new_ids, changed = remap(choice, ids, drop)
    if not changed.any():
        return Selected(topk_weights, topk_ids, 0, distinct, distinct, topk_ids)
    weights = torch.where(changed[:, None], router_weights(spec, logits, new_ids).to(topk_weights.dtype),
                          topk_weights)
    remapped = int((changed[:, None] & drop[ids]).sum())
    new_ids = new_ids.to(topk_ids.dtype)
    return Selected(weights, new_ids, remapped, distinct, int(torch.unique(new_ids).numel()), topk_ids)


def is_decode_step(num_columns: int, cached_tokens: int) -> bool:
    """A forward is a decode step when it runs one token column on a non-empty cache (the first forward on a
    cache is the prefill, even for a one-token prompt; a prefill chunked down to one column is the exception
    this rule misses: it is then selected like a decode step)."""
    return num_columns == 1 and cached_tokens > 0


def route_selected(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor, sel: ExpertSelection,
                   free: torch.Tensor | None = None) -> Selected:
    """The router (:func:`klotski.model.router.route`, the same ops) followed by :func:`select_experts` on
    h [T, H] (one batch's normed MLP inputs)."""
    from klotski.model.router import router_logits, select

    logits = router_logits(spec, w, h)
    bias = w.get("router_bias") if spec.router_bias else None
    weights, ids = select(spec, logits, bias)
    return select_experts(spec, logits, weights, ids, sel, free, bias)


class SelectionStats:
    """Per MoE layer, over the decode steps selection ran on: distinct experts per step without and with
    selection (the union over the micro-batches of one step) and assignments remapped.

    ``begin_step(key)`` opens a step (a new key commits the previous one); ``record`` adds one batch's routing.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._totals: dict[int, list[int]] = {}  # layer -> [steps, distinct exact, distinct selected, remapped, pairs]
        self._pending: dict[int, list] = {}  # layer -> [set exact, set selected, remapped, pairs] of the open step
        self._step = None

    def begin_step(self, key) -> None:
        if key != self._step:
            self._commit()
            self._step = key

    def _commit(self) -> None:
        for layer, (exact, chosen, remapped, pairs) in self._pending.items():
            t = self._totals.setdefault(layer, [0, 0, 0, 0, 0])
            t[0] += 1
            t[1] += len(exact)
            t[2] += len(chosen)
            t[3] += remapped
            t[4] += pairs
        self._pending = {}

    def record(self, layer: int, exact_ids: torch.Tensor, chosen_ids: torch.Tensor, remapped: int) -> None:
        p = self._pending.setdefault(layer, [set(), set(), 0, 0])
        p[0].update(exact_ids.flatten().tolist())
        p[1].update(chosen_ids.flatten().tolist())
        p[2] += remapped
        p[3] += exact_ids.numel()

    def chosen_this_step(self, layer: int) -> set[int]:
        """Experts the open step's earlier batches already chose at ``layer`` (loaded or loading)."""
        p = self._pending.get(layer)
        return set() if p is None else set(p[1])

    def as_dict(self, sel: ExpertSelection) -> dict:
        self._commit()
        steps = {layer: t[0] for layer, t in self._totals.items()}
        mean = lambda i: {layer: t[i] / t[0] for layer, t in sorted(self._totals.items()) if t[0]}  # noqa: E731
        remapped = sum(t[3] for t in self._totals.values())
        pairs = sum(t[4] for t in self._totals.values())
        return {
            "expert_selection": str(sel),
            "selection_decode_steps": max(steps.values(), default=0),
            "selection_remapped": remapped,
            "selection_remapped_fraction": remapped / pairs if pairs else 0.0,
            "selection_distinct_exact_per_layer": mean(1),
            "selection_distinct_per_layer": mean(2),
        }
