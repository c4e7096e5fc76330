import os

import numpy as np
import pytest

from klotski.routing_stats import RoutingStats, expected_routing

ROUTING = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "routing", "")


def monte_carlo_distinct(stats, tokens, layer, trials, rng):
    return np.mean([len(np.unique(stats.sample(tokens, layer, rng))) for _ in range(trials)])


@pytest.mark.parametrize("make", [
    lambda: RoutingStats.uniform(8, 2),
    lambda: RoutingStats.zipf(64, 8, s=1.0),
    lambda: RoutingStats.zipf(128, 8, s=1.2),
    lambda: RoutingStats.from_trace_file(ROUTING + "olmoe_arxiv_counts.json"),
    lambda: RoutingStats.from_trace_file(ROUTING + "mistral_arxiv_counts.json"),
])
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_expected_distinct_matches_monte_carlo(make, tokens):
    stats = make()
    rng = np.random.default_rng(tokens)
    layer = 7 if stats.pis else 0
    mc = monte_carlo_distinct(stats, tokens, layer, trials=600, rng=rng)
    assert stats.expected_distinct(tokens, layer) == pytest.approx(mc, rel=0.02)


def test_uniform_closed_form_and_limits():
    s = RoutingStats.uniform(8, 2)
    assert s.expected_distinct(1) == pytest.approx(2.0)
    assert s.expected_distinct(3) == pytest.approx(8 * (1 - 0.75**3))
    assert s.expected_distinct(10_000) == pytest.approx(8.0)
    assert s.cold_queue(1, num_hot=2) == pytest.approx(2.0 * 6 / 8)


def test_measured_counts_reproduce_skew():
    s = RoutingStats.from_trace_file(ROUTING + "olmoe_arxiv_counts.json")
    pi = s.inclusion(0)
    assert pi.sum() == pytest.approx(8.0)
    assert pi.max() / 8 > 0.05  # hottest expert far above uniform 1/64
    # skewed routing touches fewer experts than uniform at the same token count
    assert s.expected_distinct(16, 0) < RoutingStats.uniform(64, 8).expected_distinct(16)
    # a fitted Plackett-Luce sampler reproduces the measured marginals
    ids = s.sample(50_000, 0, np.random.default_rng(0))
    emp = np.bincount(ids.ravel(), minlength=64) / 50_000
    assert np.abs(emp - pi).max() < 0.01


def test_expected_routing_partitions_experts():
    s = RoutingStats.zipf(16, 2, s=1.0)
    r = expected_routing(s, 0, tokens_per_batch=8, n=4, num_resident=2, num_hot=2)
    res = {e for e, _ in r.resident}
    hot = {e for e, _ in r.hot} | set(r.hot_unused)
    cold = [e for e, _, _ in r.cold]
    assert res.isdisjoint(hot) and res.isdisjoint(cold) and hot.isdisjoint(cold)
    assert len(cold) == len(set(cold))
    used = len(r.resident) + len(r.hot) + len(r.cold)
    assert used == pytest.approx(s.expected_distinct(32), abs=1.5)
    firsts = [b for _, _, b in r.cold]
    assert firsts == sorted(firsts) and all(0 <= b < 4 for b in firsts)
    total = sum(t for _, t in r.resident) + sum(t for _, t in r.hot) + sum(t for _, t, _ in r.cold)
    assert total == pytest.approx(32 * 2, abs=used)


def test_counts_validation():
    with pytest.raises(ValueError, match="more assignments than tokens"):
        RoutingStats.from_counts([[10, 0, 0, 0]], top_k=2)
