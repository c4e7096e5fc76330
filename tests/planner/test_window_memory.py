"""Regression: the windowed simulation's peak memory must be the whole model's.

Found by ``test_plans_never_exceed_memory_limits``: with klotski's widest prefetch (every expert, early) and
copies faster than compute, the compute stream is periodic after a few layers but the prefetch stream runs
further ahead each layer and holds one more expert per layer. Extrapolating from the compute stream alone
took the window's peak (16.19 MiB here had been predicted as 15.82 MiB) for the model's, and the planner
accepted a plan over the 16 MiB limit.
"""
from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.schedule import Placement, build_schedule
from klotski.simulate import simulate, simulate_model_step

MiB = 1 << 20


def _setup(make_tiny_config):
    costs = ModelCosts.from_config(make_tiny_config(layers=7, experts=8, top_k=2, hidden=128, inter=256))
    hw = preset("l4").with_memory(gpu_memory=16 * MiB, cpu_memory=6 * MiB)
    return costs, hw


def test_window_peak_memory_equals_the_whole_model(make_tiny_config):
    costs, hw = _setup(make_tiny_config)
    planner = Planner(costs, hw, 128, 2)
    placement = Placement(attn="gpu", gate="gpu", shared="gpu", experts_gpu=5, experts_cpu=1, kv="gpu")
    for shape in planner.shapes(2, 4):
        kw = dict(routing=planner.routing, num_hot=8, overlap=True)
        whole = simulate(build_schedule("klotski", costs, placement, shape, **kw), hw)
        window = simulate_model_step("klotski", costs, placement, shape, hw, **kw)
        assert window.peak_mem == whole.peak_mem, shape.phase
        assert abs(window.makespan - whole.makespan) <= 1e-9 * whole.makespan, shape.phase


def test_planned_peak_is_within_the_limit(make_tiny_config):
    costs, hw = _setup(make_tiny_config)
    planner = Planner(costs, hw, 128, 2)
    plan = planner.plan("klotski")
    for shape in planner.shapes(plan.batch_size, plan.n, plan.placement.prefill_chunk):
        sched = build_schedule("klotski", costs, plan.placement, shape, planner.routing, num_hot=plan.num_hot,
                               overlap=plan.overlap)
        assert simulate(sched, hw).peak_mem["gpu"] <= hw.gpu_memory, shape.phase
