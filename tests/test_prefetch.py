import json
import os

import numpy as np
import pytest
import torch

from klotski.prefetch import CorrelationPrefetcher, PrefetchStats

ROUTING = os.path.join(os.path.dirname(__file__), "data", "routing")


def test_popularity_first_layer_and_correlation_next():
    pf = CorrelationPrefetcher(num_layers=2, num_experts=4)
    # expert 0 at layer 0 is always followed by expert 3 at layer 1; expert 1 by expert 2
    for _ in range(5):
        pf.reset_sequence()
        pf.record(0, torch.tensor([[0], [0], [1]]))
        pf.record(1, torch.tensor([[3], [3], [2]]))
    assert pf.predict(0, None, 2) == [0, 1]
    assert pf.predict(1, torch.tensor([[1]]), 1) == [2]
    assert pf.predict(1, torch.tensor([[0], [0]]), 2)[0] == 3
    assert pf.corr[1][0][3] == 10 and pf.corr[1][1][2] == 5


def test_save_load_roundtrip(tmp_path):
    pf = CorrelationPrefetcher(3, 5)
    pf.record(0, [[1, 2], [3, 4]])
    pf.record(1, [[0, 1], [1, 2]])
    path = tmp_path / "t.npz"
    pf.save(path)
    other = CorrelationPrefetcher(3, 5).load(path)
    assert np.array_equal(other.corr, pf.corr) and np.array_equal(other.popularity, pf.popularity)
    with pytest.raises(ValueError, match="expected 4 x 5"):
        CorrelationPrefetcher(4, 5).load(path)
    with pytest.raises(ValueError, match="expert ids"):
        pf.record(0, [[7, 0]])


def _sample_pairs(pairs: np.ndarray, tokens: int, rng) -> tuple[np.ndarray, np.ndarray]:
    flat = pairs.reshape(-1) / pairs.sum()
    idx = rng.choice(flat.size, size=tokens, p=flat)
    return idx // pairs.shape[0], idx % pairs.shape[0]


@pytest.mark.parametrize("model", ["olmoe", "mistral"])
def test_correlation_beats_popularity_on_real_routing(model):
    path = os.path.join(ROUTING, f"{model}_arxiv_counts.json")
    with open(path) as f:
        data = json.load(f)
    pf = CorrelationPrefetcher.from_routing_counts(path)
    pairs = np.asarray(data["crosslayer_pairs"][f"{data['layers'][0]}->{data['layers'][1]}"], dtype=np.float64)
    rng = np.random.default_rng(0)
    k = data["top_k"]
    corr_hits = pop_hits = 0
    for _ in range(200):  # small batches: 4 tokens' (prev expert -> next expert) pairs
        prev, nxt = _sample_pairs(pairs, 4, rng)
        truth = set(nxt.tolist())
        corr_hits += len(truth & set(pf.predict(1, prev[:, None], k)))
        pop_hits += len(truth & set(pf.predict(1, None, k)))
    assert corr_hits >= pop_hits
    if model == "olmoe":  # strongly skewed: the hottest expert of layer 0 ranks first by popularity
        assert pf.predict(0, None, 1) == [int(np.argmax(data["counts"][0]))]


def test_stats_precision_recall():
    s = PrefetchStats()
    s.update([0, 1], torch.tensor([[0, 2], [0, 3]]), 4)
    d = s.as_dict()
    assert d["prefetch_precision"] == 0.5 and d["prefetch_recall"] == pytest.approx(1 / 3)
    assert d["prefetch_hot_accuracy"] == 0.5
