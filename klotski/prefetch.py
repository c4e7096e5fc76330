"""Correlation-aware expert prefetcher (the Klotski paper's prefetcher: a layer-to-layer expert table).

Two tables, learned from observed routing (a warm-up pass, then online):

* ``popularity[l][j]``: how many token-expert assignments expert ``j`` of layer ``l`` received;
* ``corr[l][i][j]``: how many tokens routed to expert ``i`` at the previous recorded layer were routed to
  expert ``j`` at layer ``l`` (path length 1).

``predict(layer, prev_topk_ids, budget)`` sums, over every token about to arrive, the conditional rows
``P(j | i)`` of its previous-layer experts ``i`` (the expected number of those tokens choosing ``j``) and
returns the ``budget`` most likely experts. Without previous-layer ids (layer 0, the first MoE layer) or
without any correlation data for the layer it ranks by popularity. Rows are smoothed towards popularity so
an expert pair never seen still ranks by how hot ``j`` is.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

FORMAT = "klotski-prefetch-v1"
TABLE_NAME = "klotski_prefetch.npz"  # the learned table's file in an offload directory (or a model directory)
TABLE_GLOB = "klotski_prefetch*.npz"


def _ids(topk_ids) -> np.ndarray:
    """[T, k] expert ids (tensor or array-like) -> int64 numpy [T, k]."""
    if isinstance(topk_ids, torch.Tensor):
        topk_ids = topk_ids.detach().to("cpu")
    arr = np.asarray(topk_ids, dtype=np.int64)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    return arr.reshape(arr.shape[0], -1) if arr.size else arr.reshape(arr.shape[0], 0)  # no tokens: [0, 0]


class CorrelationPrefetcher:
    """Per-layer expert popularity and the layer-to-layer table ``corr`` [L, E, E] (counts)."""

    def __init__(self, num_layers: int, num_experts: int, smoothing: float = 1.0):
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"num_layers and num_experts must be > 0, got {num_layers}, {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.smoothing = smoothing
        self.popularity = np.zeros((num_layers, num_experts), dtype=np.float64)
        self.corr = np.zeros((num_layers, num_experts, num_experts), dtype=np.float64)
        self._last: tuple[int, np.ndarray] | None = None  # (layer, [T, k] ids) of the latest record

    # ---- learning --------------------------------------------------------------------------------------
    def _check(self, layer: int, ids: np.ndarray) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.num_experts}), got range [{ids.min()}, {ids.max()}]")

    def _onehot(self, ids: np.ndarray) -> np.ndarray:
        """[T, k] -> [T, E] counts of each expert per token."""
        out = np.zeros((ids.shape[0], self.num_experts), dtype=np.float64)
        np.add.at(out, (np.repeat(np.arange(ids.shape[0]), ids.shape[1]), ids.reshape(-1)), 1.0)
        return out

    def record(self, layer: int, topk_ids) -> None:
        """Learn one layer's routing of T tokens ([T, k] ids). Pairs with the previous record when that was an
        earlier layer over the same T tokens (call layers in order for one batch of tokens)."""
        ids = _ids(topk_ids)
        self._check(layer, ids)
        np.add.at(self.popularity[layer], ids.reshape(-1), 1.0)
        if self._last is not None:
            prev_layer, prev = self._last
            if prev_layer < layer and prev.shape[0] == ids.shape[0]:
                self.corr[layer] += self._onehot(prev).T @ self._onehot(ids)
        self._last = (layer, ids)

    def record_pairs(self, layer: int, pair_counts) -> None:
        """Add measured cross-layer counts [E, E] (``pair_counts[i][j]``: tokens at expert i of the previous
        layer and expert j of ``layer``), e.g. from a routing trace."""
        pairs = np.asarray(pair_counts, dtype=np.float64)
        if pairs.shape != (self.num_experts, self.num_experts):
            raise ValueError(f"pair counts must be [{self.num_experts}, {self.num_experts}], got {list(pairs.shape)}")
        self.corr[layer] += pairs

    def record_popularity(self, layer: int, counts) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"popularity counts must be [{self.num_experts}], got {list(counts.shape)}")
        self.popularity[layer] += counts

    def reset_sequence(self) -> None:
        """Forget the latest record (a new batch of tokens starts)."""
        self._last = None

    # ---- prediction ------------------------------------------------------------------------------------
    def scores(self, layer: int, prev_topk_ids=None) -> np.ndarray:
        """[E] expected number of the arriving tokens that pick each expert (popularity-based if no context)."""
        pop = self.popularity[layer]
        pop_p = pop / pop.sum() if pop.sum() > 0 else np.full(self.num_experts, 1.0 / self.num_experts)
        table = self.corr[layer]
        if prev_topk_ids is None or table.sum() == 0:
            return pop_p
        prev = _ids(prev_topk_ids)
        if prev.size == 0:
            return pop_p
        if prev.min() < 0 or prev.max() >= self.num_experts:
            raise ValueError(f"previous-layer expert ids must be in [0, {self.num_experts})")
        rows = table + self.smoothing * pop_p[None, :]
        cond = rows / rows.sum(axis=1, keepdims=True)  # P(j | i)
        weight = np.bincount(prev.reshape(-1), minlength=self.num_experts).astype(np.float64)
        return weight @ cond / prev.shape[1]

    def predict(self, layer: int, prev_topk_ids=None, budget: int = 1) -> list[int]:
        """Up to ``budget`` expert ids for ``layer``, most likely first (ties: lower id first)."""
        if budget <= 0:
            return []
        s = self.scores(layer, prev_topk_ids)
        order = np.lexsort((np.arange(self.num_experts), -s))
        return [int(e) for e in order[: min(budget, self.num_experts)]]

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, identity: str | None = None) -> None:
        """Write the tables to ``path`` atomically (a temporary file unique to this call, then a rename).
        ``identity``: the fingerprint of the checkpoint the routing was learned on, checked by :meth:`load`."""
        from klotski.store.directory import atomic_write

        arrays = dict(format=np.array(FORMAT), popularity=self.popularity, corr=self.corr)
        if identity is not None:
            arrays["identity"] = np.array(str(identity))
        atomic_write(os.fspath(path), lambda f: np.savez(f, **arrays))

    def load(self, path: str | os.PathLike, identity: str | None = None) -> "CorrelationPrefetcher":
        """Read tables written by :meth:`save`. ValueError for a file that is not a table, is damaged, has
        other dimensions, or (``identity`` given) was learned on another checkpoint."""
        import zipfile

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prefetch table not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data or str(data["format"]) != FORMAT:
                    raise ValueError(f"{path}: not a Klotski prefetch table ({FORMAT})")
                pop, corr = data["popularity"], data["corr"]
                saved = str(data["identity"]) if "identity" in data else None
        except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
            raise ValueError(f"{path}: damaged prefetch table ({type(e).__name__}: {e})") from None
        want = (self.num_layers, self.num_experts)
        if pop.shape != want or corr.shape != (*want, self.num_experts):
            raise ValueError(
                f"{path}: table is for {pop.shape[0]} layers x {pop.shape[1]} experts, expected {want[0]} x {want[1]}"
            )
        if identity is not None and saved is not None and saved != identity:
            raise ValueError(f"{path}: table was learned on another checkpoint (fingerprint {saved[:16]}, "
                             f"expected {identity[:16]})")
        self.popularity, self.corr = pop.astype(np.float64), corr.astype(np.float64)
        self._last = None
        return self

    @classmethod
    def from_routing_counts(cls, path: str | os.PathLike) -> "CorrelationPrefetcher":
        """A prefetcher over the recorded layers of a routing-counts JSON (``counts`` [layers][E],
        ``crosslayer_pairs["a->b"]`` [E][E]); table layer ``i`` is the file's ``layers[i]``."""
        with open(path) as f:
            data = json.load(f)
        layers, num_experts = list(data["layers"]), int(data["num_experts"])
        pf = cls(len(layers), num_experts)
        for i, counts in enumerate(data["counts"]):
            pf.record_popularity(i, counts)
        for key, pairs in data.get("crosslayer_pairs", {}).items():
            a, b = (int(x) for x in key.split("->"))
            if layers.index(a) + 1 != layers.index(b):
                continue
            pf.record_pairs(layers.index(b), pairs)
        return pf


class PrefetchStats:
    """Precision / recall of hot-set predictions over one run.

    Per prediction: ``predicted`` set P, experts actually used by the group A, and the group's true top-|P|
    hot set H. precision = |P & A| / |P|, recall = |P & A| / |A|, hot_accuracy = |P & H| / |P|.
    """

    def __init__(self):
        self.predicted = self.hits = self.used = self.hot_hits = 0
        self.predictions = 0

    def update(self, predicted: list[int], topk_ids: torch.Tensor, num_experts: int) -> None:
        if not predicted:
            return
        counts = torch.bincount(topk_ids.reshape(-1).to("cpu"), minlength=num_experts)
        used = set(torch.nonzero(counts).flatten().tolist())
        order = sorted(range(num_experts), key=lambda e: (-int(counts[e]), e))
        hot = set(order[: len(predicted)])
        p = set(predicted)
        self.predictions += 1
        self.predicted += len(p)
        self.hits += len(p & used)
        self.used += len(used)
        self.hot_hits += len(p & hot)

    def as_dict(self) -> dict:
        return {
            "prefetch_predictions": self.predictions,
            "prefetch_precision": self.hits / self.predicted if self.predicted else 0.0,
            "prefetch_recall": self.hits / self.used if self.used else 0.0,
            "prefetch_hot_accuracy": self.hot_hits / self.predicted if self.predicted else 0.0,
        }
