"""The planner's model of decode steps under expert selection (RoutingStats.with_selection) against the
selection transform itself, and its effect on a plan."""
import dataclasses

import numpy as np
import pytest
import torch

from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.model.expert_selection import ExpertSelection, select_experts
from klotski.model.router import select
from klotski.planner import Planner, selection_widths
from klotski.routing_stats import RoutingStats, expected_routing
from tests.model.test_router import spec_for


@pytest.mark.parametrize("E,k", [(8, 2), (16, 4)])
@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("a", [0.5, 1.0])
def test_expected_distinct_matches_the_transform_on_random_logits(E, k, T, a):
    spec = dataclasses.replace(spec_for(top_k=k), num_experts=E)
    g = torch.Generator().manual_seed(T)
    got = []
    for _ in range(150):
        logits = torch.randn(T, E, generator=g) * 1.5
        w, ids = select(spec, logits)
        got.append(select_experts(spec, logits, w, ids, ExpertSelection("lynx", a)).distinct_after)
    model = RoutingStats.uniform(E, k).with_selection(a).expected_distinct(T)
    assert model == pytest.approx(np.mean(got), rel=0.06)


def test_selection_model_limits():
    base = RoutingStats.zipf(16, 4, s=1.0)
    assert base.with_selection(0.0).expected_distinct(16) == pytest.approx(base.expected_distinct(16))
    sel = base.with_selection(1.0)
    assert sel.expected_distinct(1) == pytest.approx(4.0)  # one token keeps its k experts
    assert sel.expected_distinct(16) < base.expected_distinct(16)
    with pytest.raises(ValueError, match="drop fraction"):
        base.with_selection(1.5)
    # offload-aware: the resident and hot experts keep their exact touch probability
    aware = base.with_selection(1.0, keeps_free=True)
    plain_r = expected_routing(sel, 0, 16, 2, num_resident=4, num_hot=2)
    aware_r = expected_routing(aware, 0, 16, 2, num_resident=4, num_hot=2)
    exact_r = expected_routing(base, 0, 16, 2, num_resident=4, num_hot=2)
    assert len(aware_r.resident) == len(exact_r.resident) and len(aware_r.hot) == len(exact_r.hot)
    assert len(aware_r.cold) == len(plain_r.cold) < len(exact_r.cold)


def test_planner_decode_step_moves_fewer_bytes_with_selection(make_tiny_config):
    costs = ModelCosts.from_config(make_tiny_config(layers=4, experts=16, top_k=4, hidden=256, inter=512),
                                   name="tiny16")
    mib = 1 << 20
    hw = dataclasses.replace(preset("rtx3090"), gpu_memory=24 * mib, cpu_memory=1 << 40)
    base = Planner(costs, hw, 64, 16)
    sel = Planner(costs, hw, 64, 16, decode_routing=base.routing.with_selection(1.0))
    placement = base.place("klotski", 4, 2, "gpu", num_hot=4, overlap=False)
    assert placement is not None
    a = base.score("klotski", placement, 4, 2, num_hot=4, overlap=False)
    b = sel.score("klotski", placement, 4, 2, num_hot=4, overlap=False)
    assert b.prefill_s == pytest.approx(a.prefill_s)  # prefill is exact
    assert sum(b.bytes_per_step.values()) < sum(a.bytes_per_step.values())
    assert b.decode_step_s <= a.decode_step_s


def test_make_plan_prices_decode_with_the_selection(make_tiny_config):
    from klotski.runtime.planning import make_plan

    costs = ModelCosts.from_config(make_tiny_config(layers=4, experts=16, top_k=4, hidden=256, inter=512),
                                   name="tiny16")
    hw = preset("rtx3090")
    mib = 1 << 20
    exact = make_plan(costs, hw, "klotski", 24 * mib, 1 << 34, 64, 16, num_batches=2, batch_size=4)
    sel = make_plan(costs, hw, "klotski", 24 * mib, 1 << 34, 64, 16, num_batches=2, batch_size=4,
                    expert_selection=ExpertSelection("lynx", 1.0))
    off = make_plan(costs, hw, "klotski", 24 * mib, 1 << 34, 64, 16, num_batches=2, batch_size=4,
                    expert_selection=ExpertSelection.parse("lynx:0"))
    assert off == exact  # aggressiveness 0: the exact plan
    assert sel.decode_step_s <= exact.decode_step_s and sel.tokens_per_s >= exact.tokens_per_s


def test_selection_stats_union_over_micro_batches():
    from klotski.model.expert_selection import SelectionStats

    s = SelectionStats()
    s.begin_step(1)
    s.record(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0, 1], [0, 1]]), 1)
    s.record(0, torch.tensor([[3, 1]]), torch.tensor([[3, 1]]), 0)  # a second micro-batch of the same step
    assert s.chosen_this_step(0) == {0, 1, 3}
    s.begin_step(2)
    s.record(0, torch.tensor([[4, 5]]), torch.tensor([[4, 5]]), 0)
    assert s.chosen_this_step(0) == {4, 5}
    d = s.as_dict(ExpertSelection("lynx", 1.0))
    assert d["selection_decode_steps"] == 2 and d["selection_remapped"] == 1
    assert d["selection_distinct_exact_per_layer"] == {0: (4 + 2) / 2}  # {0,1,2,3} then {4,5}
    assert d["selection_distinct_per_layer"] == {0: (3 + 2) / 2}
    assert d["selection_remapped_fraction"] == pytest.approx(1 / 8)
    s.reset()
    assert s.as_dict(ExpertSelection("lynx", 1.0))["selection_decode_steps"] == 0


@pytest.mark.parametrize("k,widths", [(1, (0,)), (2, (0, 1)), (4, (0, 1, 2)), (8, (0, 1, 4))])
def test_selection_widths(k, widths):
    assert selection_widths(k) == widths


def test_planner_searches_narrow_prefetch_widths_under_selection(make_tiny_config):
    """With expert selection on decode steps the klotski search adds the narrower prefetch widths (a selected
    step needs fewer experts; each prefetched one is a load whatever the gate decides); without it, it does
    not (exact plans are searched as before). On this I/O-bound point the narrower width wins for both
    variants, and its decode step moves fewer bytes than prefetching top_k."""
    costs = ModelCosts.from_config(make_tiny_config(layers=4, experts=16, top_k=4, hidden=256, inter=512),
                                   name="tiny16")
    hw = dataclasses.replace(preset("rtx3090"), gpu_memory=24 << 20, cpu_memory=1 << 40)
    base = Planner(costs, hw, 64, 16)
    assert base.variants("klotski") == [(4, False), (16, True)]
    for keeps_free in (False, True):
        sel = Planner(costs, hw, 64, 16, decode_routing=base.routing.with_selection(0.9, keeps_free))
        assert sel.variants("klotski") == [(4, False), (16, True), (0, False), (1, False), (2, False)]
        assert sel.variants("flexgen") == base.variants("flexgen")
        scored = {}
        for hot, overlap in sel.variants("klotski"):
            p = sel.place("klotski", 4, 2, "gpu", hot, overlap)
            assert p is not None
            scored[hot] = sel.score("klotski", p, 4, 2, hot, overlap)
        best = max(scored.values(), key=lambda plan: plan.tokens_per_s)
        assert best.num_hot < 4, {h: s.tokens_per_s for h, s in scored.items()}
        moved = lambda plan: sum(plan.bytes_per_step.values())  # noqa: E731
        assert moved(best) < moved(scored[4])
