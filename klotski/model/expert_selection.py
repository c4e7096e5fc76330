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
avoided, and remapped assignments land on experts that are loaded for this step anyway (the batch's kept
set, free ones included). On an engine where every expert is resident it changes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
            raise ValueError(f"expert_selection {value!r}: aggressiveness {amount!r} is not a number in [0, 1]"
                             ) from None
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


def expert_scores(conf: np.ndarray, choice: np.ndarray, topk_ids: np.ndarray, sel: ExpertSelection):
    """Batch score per expert from binned confidence gaps: conf / choice [T, E], topk_ids [T, k] (host arrays)
    -> (scores [E], top1 [T] expert ids)."""
    T, E = conf.shape
    rows = np.arange(T)
    top1_col = np.take_along_axis(choice, topk_ids, 1).argmax(axis=1)  # first maximal column: the router's top-1
    top1 = topk_ids[rows, top1_col]
    gap = np.minimum(np.take_along_axis(conf, topk_ids, 1) - conf[rows, top1][:, None], 0.0)
    bins = np.minimum(np.floor(-gap / sel.bin_width), sel.num_bins - 1)
    contrib = np.exp(-(bins + 0.5) * sel.bin_width)
    contrib[rows, top1_col] = 1.0
    return np.bincount(topk_ids.ravel(), weights=contrib.ravel(), minlength=E), top1


def drop_set(scores: np.ndarray, used: np.ndarray, mandatory: np.ndarray, free: np.ndarray | None,
             aggressiveness: float, top_k: int) -> np.ndarray:
    """Bool [E]: the experts to drop. ``used`` / ``mandatory`` / ``free`` bool [E]."""
    droppable = used & ~mandatory
    if free is not None:
        droppable &= ~free
    ids = np.flatnonzero(droppable)
    n_drop = min(int(math.floor(aggressiveness * ids.size + 0.5)), int(used.sum()) - top_k)
    drop = np.zeros_like(used)
    if n_drop > 0:
        order = np.lexsort((-ids, scores[ids]))  # lowest score first; ties: the higher id first
        drop[ids[order[:n_drop]]] = True
    return drop


def remap(choice: np.ndarray, topk_ids: np.ndarray, drop: np.ndarray):
    """Move assignments to dropped experts onto each token's best active expert it does not use yet.
    -> (new_ids [T, k], changed [T] bool); rows that cannot be refilled keep their ids."""
    T, E = choice.shape
    used = np.bincount(topk_ids.ravel(), minlength=E) > 0
    active = used & ~drop
    moved = drop[topk_ids]  # [T, k]
    has = np.zeros((T, E), dtype=bool)
    has[np.arange(T)[:, None], topk_ids] = True
    cand = np.where(active[None, :] & ~has, choice, -np.inf)
    order = np.argsort(-cand, axis=1, kind="stable")  # descending score, ties -> lower id first
    rank = np.maximum(np.cumsum(moved, axis=1) - 1, 0)
    fill = np.take_along_axis(order, rank, 1)
    ok = np.isfinite(np.take_along_axis(cand, fill, 1)) | ~moved
    changed = moved.any(axis=1) & ok.all(axis=1)
    new_ids = np.where(moved & changed[:, None], fill, topk_ids)
    # keep the router's convention: columns by descending ranking score (top-1 first), ties by column
    cols = np.argsort(-np.take_along_axis(choice, new_ids, 1), axis=1, kind="stable")
    return np.where(changed[:, None], np.take_along_axis(new_ids, cols, 1), topk_ids), changed


def select_experts(spec: ModelSpec, logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   sel: ExpertSelection, free: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> Selected:
    """Apply ``sel`` to one batch of a decode step.

    logits [T, E] (router logits), topk_weights [T, k] fp32 / topk_ids [T, k] (the router's output on them),
    ``free`` bool [E] (offload-aware mode: experts that cost no load), ``bias`` [E] (DeepSeek-V3's
    e_score_correction_bias). Returns :class:`Selected`; with selection off the inputs come back as they are.
    The choice runs on the host over [T, E] arrays (one small copy; no per-op device syncs); the new weights
    are computed on the logits' device.
    """
    T, k = topk_ids.shape
    if logits.dim() != 2 or logits.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"select_experts: logits [T, E] and topk_weights/topk_ids [T, k] must agree, got "
                         f"{list(logits.shape)}, {list(topk_weights.shape)}, {list(topk_ids.shape)}")
    E = logits.shape[1]
    if not sel.enabled or T == 0 or k >= E:
        return Selected(topk_weights, topk_ids, 0, _distinct(topk_ids, E), _distinct(topk_ids, E), topk_ids)
    if free is not None and tuple(free.shape) != (E,):
        raise ValueError(f"select_experts: free must be a bool mask [{E}], got {list(free.shape)}")
    conf, choice = router_scores(spec, logits, bias)
    conf, choice = conf.cpu().numpy(), choice.cpu().numpy()
    ids = topk_ids.cpu().numpy().astype(np.int64)
    distinct = _distinct(ids, E)
    scores, top1 = expert_scores(conf, choice, ids, sel)
    used = np.bincount(ids.ravel(), minlength=E) > 0
    mandatory = np.zeros(E, dtype=bool)
    mandatory[top1] = True
    keep_free = free.cpu().numpy().astype(bool) if sel.offload_aware and free is not None else None
    drop = drop_set(scores, used, mandatory, keep_free, sel.aggressiveness, k)
    if not drop.any():
        return Selected(topk_weights, topk_ids, 0, distinct, distinct, topk_ids)
    new_ids, changed = remap(choice, ids, drop)
    if not changed.any():
        return Selected(topk_weights, topk_ids, 0, distinct, distinct, topk_ids)
    remapped = int((changed[:, None] & drop[ids]).sum())
    new = torch.from_numpy(new_ids).to(device=topk_ids.device, dtype=topk_ids.dtype)
    rows = torch.from_numpy(changed).to(topk_ids.device)
    weights = torch.where(rows[:, None], router_weights(spec, logits, new.long()).to(topk_weights.dtype),
                          topk_weights)
    return Selected(weights, new, remapped, distinct, _distinct(new_ids, E), topk_ids)


def _distinct(ids, num_experts: int) -> int:
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    return int(np.count_nonzero(np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=num_experts)))


def is_decode_step(num_columns: int, cached_tokens: int) -> bool:
    """A forward is a decode step when it runs one token column on a non-empty cache (the first forward on a
    cache is the prefill, even for a one-token prompt). A prefill run in chunks is the exception the caller
    knows and this rule cannot see: the offloaded executor marks each of its passes, a one-column chunk too,
    as no decode step (``StepState(..., decode=False)``)."""
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
