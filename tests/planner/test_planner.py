import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klotski.costs import ModelCosts
from klotski.hardware import PRESETS, preset
from klotski.planner import InfeasibleError, Planner
from klotski.presets import MODEL_CONFIGS, model_config
from klotski.program import order_of
from klotski.schedule import build_schedule
from klotski.simulate import simulate

GiB = 1 << 30


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layers=st.integers(2, 8), experts=st.sampled_from([2, 4, 8]), top_k=st.integers(1, 2),
    hidden=st.sampled_from([128, 256, 512]), inter=st.sampled_from([256, 1024]),
    gpu_mib=st.integers(4, 400), cpu_mib=st.integers(4, 2000), policy=st.sampled_from(
        ["klotski", "flexgen", "layerwise", "resident"]),
    prompt=st.sampled_from([16, 128]), gen=st.sampled_from([2, 8]),
)
def test_plans_never_exceed_memory_limits(make_tiny_config, layers, experts, top_k, hidden, inter, gpu_mib,
                                          cpu_mib, policy, prompt, gen):
    costs = ModelCosts.from_config(make_tiny_config(layers, experts, top_k, hidden, inter))
    hw = preset("l4").with_memory(gpu_memory=gpu_mib << 20, cpu_memory=cpu_mib << 20)
    planner = Planner(costs, hw, prompt, gen)
    try:
        plan = planner.plan(policy)
    except InfeasibleError as e:
        assert e.min_gpu_memory > 0
        return
    # re-simulate the whole model (no window) for both phases: every tier within its limit
    for shape in planner.shapes(plan.batch_size, plan.n, plan.placement.prefill_chunk):  # (a chunked prefill: one pass)
        sched = build_schedule(order_of(policy, plan.num_hot), costs, plan.placement, shape, planner.routing,
                               num_hot=plan.num_hot, overlap=plan.overlap)
        res = simulate(sched, hw)
        assert res.peak_mem["gpu"] <= hw.gpu_memory
        assert res.peak_mem["cpu"] <= hw.cpu_memory
    assert plan.tokens_per_s > 0 and 0 <= plan.bubble_fraction <= 1


def _rotated_pairs(per_model: int = 2):
    """Each model on ``per_model`` presets spread over the list and rotated from model to model, so every
    preset meets several models (the whole grid, 7 models x 6 presets, is ~6 minutes of a 2-core CI box)."""
    presets, models = list(PRESETS), list(MODEL_CONFIGS)
    step = len(presets) // per_model
    return [(m, presets[(i + j * step) % len(presets)]) for i, m in enumerate(models) for j in range(per_model)]


@pytest.mark.parametrize("model,hw_name", _rotated_pairs())
def test_policy_order_on_presets(model, hw_name):
    """klotski is never predicted slower than flexgen, nor flexgen than layerwise (each with its best plan)."""
    costs = ModelCosts.from_config(model_config(model), name=model)
    plans = Planner(costs, PRESETS[hw_name], 512, 32).compare(("layerwise", "flexgen", "klotski"))
    rate = {p: (v.tokens_per_s if v is not None else 0.0) for p, v in plans.items()}
    assert rate["flexgen"] >= rate["layerwise"] * (1 - 1e-9), (model, hw_name, rate)
    assert rate["klotski"] >= rate["flexgen"] * (1 - 1e-9), (model, hw_name, rate)


@pytest.mark.parametrize("model,hw,gpu,cpu", [("mixtral-8x7b", "rtx3090-pcie4", "24GB", "256GB"),
                                              ("mixtral-8x22b", "h800-pcie5", None, None)])
def test_paper_setups_plan_fast(model, hw, gpu, cpu):
    costs = ModelCosts.from_config(model_config(model), name=model)
    t0 = time.process_time()  # CPU seconds: other jobs on the machine stretch wall time, not this
    plans = Planner(costs, preset(hw).with_memory(gpu, cpu), 512, 32).compare()
    assert time.process_time() - t0 < 5.0
    k = plans["klotski"]
    assert k is not None and k.tokens_per_s > 0
    assert plans["resident"] is None  # the model does not fit the GPU


def test_impossible_limits_name_the_smallest_memory():
    costs = ModelCosts.from_config(model_config("mixtral-8x7b"))
    hw = preset("rtx3090").with_memory(gpu_memory="1GiB", cpu_memory="1GiB")
    with pytest.raises(InfeasibleError, match=r"needs GPU >= [0-9.]+ GiB") as info:
        Planner(costs, hw, 512, 32).plan("klotski")
    gpu, cpu = info.value.min_gpu_memory, info.value.min_cpu_memory
    assert gpu > 1 * GiB
    # with the reported minimum the plan exists
    plan = Planner(costs, preset("rtx3090").with_memory(gpu + (64 << 20), max(cpu, 2 * GiB) + (64 << 20)), 512,
                   32).plan("klotski")
    assert plan.peak_mem["gpu"] <= gpu + (64 << 20)


def test_skewed_routing_helps_klotski():
    from klotski.routing_stats import RoutingStats

    costs = ModelCosts.from_config(model_config("olmoe-1b-7b"))
    hw = preset("t4").with_memory(gpu_memory="3GiB")
    uniform = Planner(costs, hw, 128, 8).plan("klotski")
    trace = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "routing", "olmoe_arxiv_counts.json")
    skew = Planner(costs, hw, 128, 8, RoutingStats.from_trace_file(trace)).plan("klotski")
    assert skew.tokens_per_s >= uniform.tokens_per_s * 0.999


def test_rates_within_the_tie_keep_the_plan_found_first(tiny_costs):
    """A plan replaces the incumbent only when predicted faster by more than RATE_TIE: two simulations of one
    step that differ in rounding only (a window extrapolated or not: 1e-15 apart) do not decide the plan."""
    from dataclasses import replace

    from klotski.plan import RATE_TIE

    first = Planner(tiny_costs, preset("l4"), 128, 8).plan("klotski")
    r = first.tokens_per_s
    assert first.beats(None)
    assert not replace(first, tokens_per_s=r * (1 + 1e-15)).beats(first)
    assert not replace(first, tokens_per_s=r * (1 + RATE_TIE / 2)).beats(first)
    assert replace(first, tokens_per_s=r * (1 + 2 * RATE_TIE)).beats(first)
    assert not first.beats(replace(first, tokens_per_s=r * (1 - 1e-15)))
