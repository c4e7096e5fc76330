"""Hand-checked schedules: two layers, two experts top-1, fixed op durations (see comments for timelines)."""
import pytest

from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.routing_stats import RoutingStats
from klotski.schedule import Placement, StepShape, build_schedule, staging_bytes
from klotski.simulate import simulate, simulate_model_step
from klotski.trace import chrome_trace, write_timeline_png

UNITS = {"attn": 1.0, "gate": 1.0, "expert": 2.0, "shared": 0.0, "lm_head": 0.0, "release": 0.0, "kv_load": 0.0, "kv_store": 0.0}


def unit_duration(expert_bytes):
    def f(op):
        if op.kind == "h2d":
            return 3.0 * op.bytes / expert_bytes  # one expert: 3
        if op.kind == "read":
            return 2.0 * op.bytes / expert_bytes  # one expert from disk: 2, then its h2d copy
        if op.kind == "experts":
            return 2.0 * op.calls
        return UNITS[op.kind]
    return f


@pytest.fixture
def setup(tiny_costs):
    placement = Placement(attn="gpu", gate="gpu", shared="gpu", experts_gpu=0, kv="gpu")
    shape = StepShape("decode", batch_size=8, n=2, q_len=1, past_len=4, context_len=8)
    return tiny_costs, placement, shape, RoutingStats.uniform(2, 1), unit_duration(tiny_costs.layers[0].expert_bytes)


def run(policy, setup, **kw):
    costs, placement, shape, routing, dur = setup
    sched = build_schedule(policy, costs, placement, shape, routing, **kw)
    return sched, simulate(sched, duration=dur)


def test_layerwise(setup):
    # per layer: load both experts (6) while attn 1 + gate 1 run, then experts 2x2: 10 per layer; the next
    # layer loads only after this one released its slots: L0 load [0,6] attn [0,1] gate [1,2] experts [6,10];
    # L1 load [10,16] attn [10,11] gate [11,12] experts [16,20]
    sched, res = run("layerwise", setup)
    assert res.makespan == pytest.approx(20.0)
    assert res.bubble_fraction == pytest.approx(8 / 20)


def test_flexgen(setup):
    # load L0 [0,6], L1 [6,12]; L0 attn [0,1] [1,2] gate b0 [2,3] experts b0 [6,10] gate b1 [10,11]
    # experts b1 [11,15]; L1 attn [15,16] [16,17] gate [17,18] experts [18,22] gate [22,23] experts [23,27]
    sched, res = run("flexgen", setup)
    assert res.makespan == pytest.approx(27.0)
    assert res.bubble_fraction == pytest.approx(3 / 27)


def test_flexgen_without_overlap_waits_for_each_layer(setup):
    sched, res = run("flexgen", setup, overlap=False)
    # L1's load starts once L0 has released its slots (15): [15,21]; L1 attn [15,16] [16,17] gate [17,18]
    # experts [21,25] gate [25,26] experts [26,30]
    assert res.makespan == pytest.approx(30.0)


def test_klotski(setup):
    # L0: hot e0 prefetch [0,3]; attn [0,1] gate [1,2] -> cold e1 [2,5]; attn [2,3] gate [3,4];
    #     e0 [4,6], e1 [6,8]. L1 prefetch e0 (issued with L0, after it) [3,6]; attn [8,9] gate [9,10] -> e1
    #     [10,13]; attn [10,11] gate [11,12]; e0 [12,14], e1 [14,16]. Compute never idles.
    sched, res = run("klotski", setup)
    assert res.makespan == pytest.approx(16.0)
    assert res.bubble_fraction == pytest.approx(0.0)
    computes = [(op.kind, op.experts or op.expert) for op in sched.ops if op.kind in ("expert", "experts")]
    assert computes == [("experts", (0,)), ("expert", 1)] * 2  # hot in one call first, then cold
    assert all(op.device == "gpu" for op in sched.ops if op.is_compute)


def test_klotski_experts_from_disk(setup):
    # every disk load is a read (disk link, 2) then its copy (h2d link, 3) on the stream that loads it.
    # L0: prefetch e0 read [0,2] h2d [2,5]; attn [0,1] gate [1,2] -> expert_io e1 read [2,4], h2d waits for
    #     the h2d link: [5,8]; attn [2,3] gate [3,4]; e0 [5,7], e1 [8,10].
    # L1: prefetch e0 (issued at the start: its stream is free at 5) read [5,7], h2d waits for the link: [8,11];
    #     attn [10,11] gate [11,12] -> e1 read [12,14] h2d [14,17]; attn [12,13] gate [13,14]; e0 [14,16],
    #     e1 [17,19].
    costs, placement, shape, routing, dur = setup
    disk = Placement(attn="gpu", gate="gpu", shared="gpu", experts_gpu=0, experts_cpu=0, kv="gpu")
    sched = build_schedule("klotski", costs, disk, shape, routing)
    res = simulate(sched, duration=dur)
    assert res.makespan == pytest.approx(19.0)
    reads = [op for op in sched.ops if op.kind == "read"]
    assert [(op.stream, op.layer, op.expert) for op in reads] == [
        ("prefetch", 0, 0), ("prefetch", 1, 0), ("expert_io", 0, 1), ("expert_io", 1, 1)]
    assert res.bytes_moved["disk"] == res.bytes_moved["h2d"] == 4 * costs.layers[0].expert_bytes
    assert not [op for op in sched.ops if op.mem_alloc.get("cpu")]  # staged in the static ring only


def test_flexgen_layers_from_disk(setup):
    # a layer's load reads both experts (4) then copies them (6), serially on the prefetch stream:
    # L0 [0,4] [4,10]; L1 [10,14] [14,20]; L0 attn/attn/gate by 3, experts b0 [10,14] gate [14,15]
    # experts b1 [15,19]; L1 attn [19,21] gate [21,22] experts [22,26] gate [26,27] experts [27,31]
    costs, placement, shape, routing, dur = setup
    disk = Placement(attn="gpu", gate="gpu", shared="gpu", experts_gpu=0, experts_cpu=0, kv="gpu")
    res = simulate(build_schedule("flexgen", costs, disk, shape, routing), duration=dur)
    assert res.makespan == pytest.approx(31.0)


def test_klotski_wide_early_prefetch(setup):
    # both experts prefetched: L0 [0,3] [3,6], L1 [6,9] [9,12]; L0 attn/gate x2 [0,4], its grouped call waits
    # for both hot loads: [6,10]; L1 attn/gate x2 [10,14], call [14,18]
    sched, res = run("klotski", setup, num_hot=2, overlap=True)
    assert res.makespan == pytest.approx(18.0)


def test_klotski_uses_less_gpu_memory_than_flexgen(make_tiny_config):
    # the pools: klotski streams through top_k hot + top_k + 2 slots, flexgen holds two layers of experts
    costs = ModelCosts.from_config(make_tiny_config(experts=8, top_k=2))
    shape = StepShape("decode", batch_size=8, n=2, q_len=1, past_len=4, context_len=8)
    p = Placement(experts_gpu=0, kv="gpu")
    k = simulate(build_schedule("klotski", costs, p, shape, num_hot=2, overlap=False), preset("rtx3090"))
    f = simulate(build_schedule("flexgen", costs, p, shape), preset("rtx3090"))
    expert = costs.device_bytes(costs.layers[0].expert_bytes, expert=True)
    assert f.peak_mem["gpu"] - k.peak_mem["gpu"] == (16 - 6) * expert


def test_resident_has_no_weight_traffic(setup):
    sched, res = run("resident", setup)
    assert not [op for op in sched.ops if op.link]
    assert res.bubble_fraction == pytest.approx(0.0)


def test_memory_is_released(tiny_costs):
    shape = StepShape("decode", 4, 3, 1, 16, 20)
    for policy in ("layerwise", "flexgen", "klotski"):
        p = Placement(attn="cpu", gate="cpu", shared="cpu", experts_cpu=1, kv="cpu")
        sched = build_schedule(policy, tiny_costs, p, shape)
        assert any(op.link == "disk" for op in sched.ops), policy
        for tier in ("gpu", "cpu"):  # disk reads stage in the static ring: no dynamic host memory
            alloc = sum(op.mem_alloc.get(tier, 0) for op in sched.ops)
            freed = sum(op.mem_free.get(tier, 0) for op in sched.ops)
            assert alloc == freed, (policy, tier)
        assert sched.static_mem["cpu"] >= staging_bytes(tiny_costs, p) > 0


@pytest.mark.parametrize("policy", ["layerwise", "flexgen", "klotski"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("disk", [False, True])
def test_window_extrapolation_is_exact(policy, phase, disk, make_tiny_config):
    costs = ModelCosts.from_config(make_tiny_config(layers=14, experts=8, top_k=2, hidden=256, inter=512))
    hw = preset("rtx3090")
    shape = StepShape(phase, 4, 3, 64 if phase == "prefill" else 1, 0 if phase == "prefill" else 64, 96)
    p = Placement(attn="cpu", gate="gpu", experts_gpu=1, experts_cpu=4 if disk else None, kv="cpu")
    full = simulate(build_schedule(policy, costs, p, shape), hw)
    fast = simulate_model_step(policy, costs, p, shape, hw)
    assert fast.makespan == pytest.approx(full.makespan, rel=1e-9)
    for stream, busy in full.busy.items():
        assert fast.busy[stream] == pytest.approx(busy, rel=1e-9)
    assert fast.peak_mem == full.peak_mem


@pytest.mark.parametrize("policy", ["flexgen", "klotski"])
def test_window_extrapolation_is_exact_with_cpu_mode_contention(policy, make_tiny_config):
    """A calibrated CPU-mode profile (kind costs, contention 0.5): the window's extrapolation adds the
    contention the simulated last layer paid, and matches simulating every layer."""
    from dataclasses import replace

    costs = ModelCosts.from_config(make_tiny_config(layers=14, experts=8, top_k=2, hidden=256, inter=512))
    kinds = {"attn": [2e-4, 0.0], "gate": [5e-5, 1e-6], "expert": [3e-5, 2e-6], "experts": [4e-5, 2e-6]}
    hw = replace(preset("rtx3090"), device="cpu", kind_costs=kinds, cpu_kind_costs=kinds, contention=0.5)
    shape = StepShape("decode", 4, 3, 1, 64, 96)
    p = Placement(attn="gpu", gate="gpu", experts_gpu=1, kv="cpu")
    full = simulate(build_schedule(policy, costs, p, shape), hw)
    assert full.contended  # ops started beside another lane
    fast = simulate_model_step(policy, costs, p, shape, hw)
    assert fast.layers_simulated < costs.num_layers
    assert fast.makespan == pytest.approx(full.makespan, rel=1e-9)
    for stream, busy in full.busy.items():
        assert fast.busy[stream] == pytest.approx(busy, rel=1e-9)
    assert fast.peak_mem == full.peak_mem


def test_window_extrapolates_when_the_end_reaches_two_layers_back(make_tiny_config):
    """klotski's prefetch for the last layer is issued two layers before it, so the layer before the last
    already runs shorter than the period: steady state is found further back, and the window still
    extrapolates (before: it grew to the whole model, 61 layers of DeepSeek-V3 per candidate)."""
    costs = ModelCosts.from_config(make_tiny_config(layers=14, experts=8, top_k=2, hidden=256, inter=512))
    hw = preset("rtx3090")
    shape = StepShape("decode", 2, 1, 1, 64, 96)
    p = Placement(attn="cpu", gate="gpu", shared="gpu", experts_gpu=1, kv="cpu")
    sched = build_schedule("klotski", costs, p, shape, num_hot=2, overlap=False)
    full = simulate(sched, hw)
    c = [full.finish[i] for i in sched.layer_last_compute]
    period = c[-3] - c[-4]
    assert c[-2] - c[-3] < period * (1 - 1e-6)  # the layer before the last is already off the period
    fast = simulate_model_step("klotski", costs, p, shape, hw, num_hot=2, overlap=False)
    assert fast.layers_simulated < costs.num_layers
    assert fast.makespan == pytest.approx(full.makespan, rel=1e-9)
    assert fast.peak_mem == full.peak_mem


def test_trace_exports(setup, tmp_path):
    sched, res = run("klotski", setup)
    trace = chrome_trace(sched, res)
    rows = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert {"compute", "prefetch", "expert_io"} <= rows
    assert all(e["dur"] >= 0 for e in trace["traceEvents"] if e["ph"] == "X")
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    write_timeline_png(sched, res, out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_deadlock_and_bad_deps_are_reported(setup):
    sched, _ = run("klotski", setup)
    sched.ops[0].deps = (5,)
    with pytest.raises(ValueError, match="later op"):
        simulate(sched, duration=lambda op: 1.0)


def _hand_schedule(ops):
    from klotski.schedule import Schedule

    return Schedule("klotski", StepShape("decode", 1, 1, 1, 4, 8), Placement(), ops, {}, 1, [])


def test_urgent_copy_runs_beside_a_weight_copy_and_delays_the_next():
    """Timeline (h2d link): prefetch A 0-10; the KV load ready at 2 does not wait for A (a second copy engine),
    runs 2-3 and takes 1 of the link's time: the next prefetch B starts at 11, not 10. A post-gate expert load
    (not urgent) ready at 2 waits for the link as before."""
    from klotski.schedule import Op

    def op(i, kind, stream, link="h2d", deps=(), d=1.0):
        return Op(i, kind, stream, "gpu", 0, deps=deps, link=link, bytes=1, duration=d)

    ops = [op(0, "h2d", "prefetch", d=10.0), op(1, "gate", "compute", link=None, d=2.0),
           op(2, "kv_load", "kv_load", deps=(1,)), op(3, "h2d", "prefetch", d=4.0)]
    res = simulate(_hand_schedule(ops), duration=lambda op: op.duration)
    assert (res.start[2], res.finish[2]) == (2.0, 3.0)
    assert (res.start[3], res.finish[3]) == (11.0, 15.0)
    assert res.resource_busy["h2d"] == 15.0 and res.roofline == 15.0 == res.makespan
    ops[2] = op(2, "h2d", "expert_io", deps=(1,))
    res = simulate(_hand_schedule(ops), duration=lambda op: op.duration)
    assert res.start[2] == 10.0


def test_host_lanes_share_the_cpu():
    """CPU attention and a CPU expert call ready together take turns on the host's cores (attention first: its
    lane is the more urgent); a device op beside them overlaps; the roofline is the CPU's 5 + 3."""
    from klotski.schedule import Op

    ops = [Op(0, "experts", "cpu_experts", "cpu", 0, duration=5.0),
           Op(1, "attn_core", "cpu_attn", "cpu", 0, duration=3.0),
           Op(2, "expert", "compute", "gpu", 0, duration=4.0)]
    res = simulate(_hand_schedule(ops), duration=lambda op: op.duration)
    assert sorted([(res.start[i], res.finish[i]) for i in (0, 1)]) == [(0.0, 3.0), (3.0, 8.0)]
    assert (res.start[2], res.finish[2]) == (0.0, 4.0)
    assert res.resource_busy == {"cpu": 8.0, "gpu": 4.0} and res.roofline == 8.0 == res.makespan


def test_cpu_mode_contention_slows_an_op_that_starts_beside_another_lane(setup):
    """CPU mode with a calibrated contention (0.5): a compute op that starts while a copy of another lane runs
    pays its own fixed costs 1.5x; one that starts alone, and every op on a GPU profile, does not. The busy
    time counts what was added."""
    from dataclasses import replace

    from klotski.costs import op_timer
    from klotski.schedule import Op

    base = replace(preset("rtx3090"), device="cpu", kind_costs={"gate": [1e-3, 0.0]},
                   cpu_kind_costs={"gate": [1e-3, 0.0]})
    hw = replace(base, contention=0.5)
    ops = [Op(0, "gate", "compute", "gpu", 0, tokens=1),
           Op(1, "h2d", "prefetch", "gpu", 0, link="h2d", bytes=10 ** 8, deps=(0,)),
           Op(2, "gate", "compute", "gpu", 0, tokens=1, deps=(0,))]
    timer = op_timer(base, "float32")
    res = simulate(_hand_schedule(ops), hw, dtype="float32")
    assert res.finish[0] - res.start[0] == pytest.approx(timer(ops[0]))  # alone
    assert res.start[1] == res.start[2] == res.finish[0]
    assert res.finish[2] - res.start[2] == pytest.approx(timer(ops[2]) + 0.5e-3)  # beside the copy
    assert res.busy["compute"] == pytest.approx(2 * timer(ops[0]) + 0.5e-3)
    on_gpu = simulate(_hand_schedule(ops), replace(hw, device="cuda"), dtype="float32")
    gpu_timer = op_timer(replace(base, device="cuda"), "float32")
    assert on_gpu.finish[2] - on_gpu.start[2] == pytest.approx(gpu_timer(ops[2]))
