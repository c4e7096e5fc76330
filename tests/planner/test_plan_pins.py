"""The planner's speed-ups (bound pruning, seeds first, simulator tuning) must not change what it decides.

PINS were computed by the unpruned search of commit 28ff2ff (before the speed-ups) with
``Planner(costs, preset, 512, 32).compare(("layerwise", "flexgen", "klotski"))``. A deliberate change to the
cost model or schedule moves them: recompute with ``python tests/planner/test_plan_pins.py`` and say why
in the commit. The other tests need no pins: the pruned search equals the unpruned one, and the bound
is never below a simulated rate.
"""
import pytest

from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.presets import model_config
from klotski.schedule import Placement

P = Placement
PINS = {  # (model, hardware) -> policy -> (batch, n, placement, num_hot, overlap, tokens/s)
    ("mixtral-8x7b", "rtx3090-pcie4"): {
        "layerwise": (64, 1, P(kv="gpu"), None, False, 13.306054349491014),
        "flexgen": (16, 6, P(attn="cpu", kv="gpu"), None, True, 18.56443344196263),
        "klotski": (16, 6, P(kv="gpu"), 2, False, 19.040257418409226),
    },
    ("mixtral-8x22b", "h800-pcie5"): {
        "layerwise": (256, 1, P(kv="cpu"), None, False, 36.915562296606815),
        "flexgen": (16, 16, P(attn="cpu", kv="gpu"), None, True, 40.28164646005339),
        "klotski": (16, 16, P(kv="gpu"), 2, False, 41.899262598160284),
    },
    ("qwen1.5-moe-a2.7b", "t4"): {
        "layerwise": (128, 1, P(experts_gpu=1, kv="cpu"), None, False, 26.175396665317518),
        "flexgen": (16, 24, P(shared="cpu", kv="cpu"), None, False, 37.48406311946068),
        "klotski": (16, 24, P(attn="cpu", shared="cpu", experts_gpu=1, kv="cpu"), 4, False, 37.66849666769646),
    },
    ("deepseek-v2-lite", "h100-80gb"): {
        "layerwise": (256, 1, P(experts_gpu=64, kv="gpu"), None, False, 4345.83474289349),
        "flexgen": (256, 2, P(experts_gpu=64, kv="gpu"), None, True, 4346.2036468545875),
        "klotski": (512, 1, P(experts_gpu=61, kv="gpu"), 6, False, 5679.668837171047),
    },
}


def _compare(model, hw, prune=True):
    costs = ModelCosts.from_config(model_config(model), name=model)
    planner = Planner(costs, preset(hw), 512, 32)
    planner.prune = prune
    return planner, planner.compare(("layerwise", "flexgen", "klotski"))


@pytest.mark.parametrize("model,hw", list(PINS))
def test_plans_match_the_pins(model, hw):
    _, plans = _compare(model, hw)
    for policy, (b, n, placement, num_hot, overlap, rate) in PINS[(model, hw)].items():
        p = plans[policy]
        assert (p.batch_size, p.n, p.placement, p.num_hot, p.overlap) == (b, n, placement, num_hot, overlap), policy
        assert p.tokens_per_s == pytest.approx(rate, rel=1e-6), policy


@pytest.mark.parametrize("model,hw", [("mixtral-8x7b", "t4"), ("olmoe-1b-7b", "rtx3090-pcie4")])
def test_pruned_search_equals_the_full_search(model, hw):
    _, fast = _compare(model, hw)
    full_planner, full = _compare(model, hw, prune=False)
    for policy in full:
        a, b = fast[policy], full[policy]
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.batch_size, a.n, a.placement, a.num_hot, a.overlap) == \
                (b.batch_size, b.n, b.placement, b.num_hot, b.overlap), policy
            assert a.tokens_per_s == b.tokens_per_s
    # the bound never undercuts a simulated candidate of the full search
    evaluated = [(k[1:], plan) for k, plan in full_planner._cache.items() if k[0] == "eval" and plan is not None]
    assert len(evaluated) > 20
    for args, plan in evaluated:
        assert full_planner.upper_bound(*args) >= plan.tokens_per_s * (1 - 1e-12), args


if __name__ == "__main__":
    for model, hw in PINS:
        _, plans = _compare(model, hw, prune=False)
        for policy, p in plans.items():
            print((model, hw, policy), (p.batch_size, p.n, p.placement, p.num_hot, p.overlap, p.tokens_per_s))
