"""Host compute in the planner: Fiddler's cold-expert rule from its own constants, monotone in the token count;
the simulator prices CPU attention and CPU experts on their own lanes without KV copies; on the T4 and RTX 3090
presets with Mixtral-8x7B the planner keeps prefill attention on the GPU and moves decode attention to the CPU
once the context is long (at the latest at the roofline crossover), and stays there."""
from dataclasses import replace

import pytest

from klotski.costs import ModelCosts, op_seconds
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.presets import model_config
from klotski.program.host import ExpertRule, HostCompute, attention_seconds, fiddler_rule, parse_host_compute
from klotski.schedule import Placement, StepShape, build_schedule
from klotski.simulate import simulate

MIXTRAL = ModelCosts.from_config(model_config("mixtral-8x7b"), name="mixtral-8x7b")
FIDDLER_CPU_S_PER_TOKEN, FIDDLER_LOAD_S = 7e-3, 70e-3  # Fiddler's measured constants (arXiv 2402.07033)


def fiddler_profile(costs: ModelCosts):
    """A profile on which an expert of ``costs`` costs Fiddler's constants: 7 ms per token on the CPU (compute
    bound, no fixed cost), 70 ms to copy over the link, nothing on the GPU."""
    lc = costs.layers[0]
    flops_per_token = costs.expert_flops(0, 1)
    base = preset("rtx3090")
    return replace(base, h2d_bandwidth=lc.expert_bytes / FIDDLER_LOAD_S, d2h_bandwidth=1e30, transfer_latency_s=0.0,
                   cpu_matmul_flops={"bfloat16": flops_per_token / FIDDLER_CPU_S_PER_TOKEN},
                   cpu_mem_bandwidth=1e30, cpu_op_overhead_s=0.0, matmul_flops={"bfloat16": 1e30},
                   device_mem_bandwidth=1e30, op_overhead_s=0.0)


def test_fiddler_rule_from_its_constants():
    on_cpu = [fiddler_rule(n, FIDDLER_CPU_S_PER_TOKEN, FIDDLER_LOAD_S) for n in range(1, 40)]
    assert on_cpu == [n <= 9 for n in range(1, 40)]


def test_expert_rule_reproduces_fiddler_on_its_profile():
    hw = fiddler_profile(MIXTRAL)
    rule = ExpertRule(MIXTRAL, hw)
    layer = MIXTRAL.spec.moe_layers[0]
    # the cost model's own times give back Fiddler's constants
    assert rule.load_seconds(layer) == pytest.approx(FIDDLER_LOAD_S, rel=1e-9)
    # (plus the hidden rows and outputs crossing the link: microseconds)
    assert rule.cpu_seconds(layer, 5) == pytest.approx(5 * FIDDLER_CPU_S_PER_TOKEN, rel=1e-3)
    assert rule.max_cpu_tokens(layer) == 9
    choices = [rule.cpu_wins(layer, n) for n in range(0, 64)]
    assert choices == [n <= 9 for n in range(0, 64)]


@pytest.mark.parametrize("hw", ["t4", "rtx3090", "l4"])
def test_expert_rule_is_monotone_on_presets(hw):
    rule = ExpertRule(MIXTRAL, preset(hw))
    layer = MIXTRAL.spec.moe_layers[0]
    cheaper = [rule.cpu_seconds(layer, t) < rule.load_seconds(layer) + rule.gpu_seconds(layer, t)
               for t in range(0, 4096, 7)]
    assert cheaper == sorted(cheaper, reverse=True)  # True ... True False ... False
    t = rule.max_cpu_tokens(layer)
    assert 0 < t < 4096 and rule.cpu_wins(layer, t) and not rule.cpu_wins(layer, t + 1)


def _decode_schedule(host, b=4, n=2, past=1024, placement=None):
    placement = placement or Placement(kv="cpu", experts_gpu=1, experts_cpu=None)
    shape = StepShape("decode", b, n, 1, past, past + 64)
    rule = ExpertRule(MIXTRAL, preset("rtx3090"))
    return build_schedule("klotski", MIXTRAL, placement, shape, host=host, expert_rule=rule, num_layers=4)


def test_cpu_attention_has_no_kv_copies_and_runs_on_its_lane():
    gpu = _decode_schedule(HostCompute())
    cpu = _decode_schedule(HostCompute(decode_attn="cpu"))
    assert {op.kind for op in gpu.ops} >= {"kv_load", "kv_store", "attn"}
    kinds = {op.kind for op in cpu.ops}
    assert not kinds & {"kv_load", "kv_store", "attn"}
    assert {"attn_qkv", "attn_core", "attn_out", "act_d2h", "act_h2d"} <= kinds
    assert {op.stream for op in cpu.ops if op.kind == "attn_core"} == {"cpu_attn"}
    assert {op.device for op in cpu.ops if op.kind == "attn_core"} == {"cpu"}
    hw = preset("rtx3090")
    res = simulate(cpu, hw, dtype="bfloat16")
    assert res.busy["cpu_attn"] > 0 and "kv_load" not in res.busy
    # no KV byte crosses the link; only Q/K/V and the attention output do
    kv = sum(op.bytes for op in gpu.ops if op.kind in ("kv_load", "kv_store"))
    act = sum(op.bytes for op in cpu.ops if op.kind in ("act_d2h", "act_h2d"))
    assert kv > 10 * act > 0


def test_cpu_experts_are_not_loaded():
    loaded = _decode_schedule(HostCompute())
    on_cpu = _decode_schedule(HostCompute(experts="all"))
    h2d = lambda s: sum(op.bytes for op in s.ops if op.kind == "h2d" and op.tensor == "expert")  # noqa: E731
    cpu_calls = [op for op in on_cpu.ops if op.kind == "experts" and op.device == "cpu"]
    assert cpu_calls and all(op.stream == "cpu_experts" for op in cpu_calls)
    assert h2d(on_cpu) < h2d(loaded)
    # the prefetched hot experts still load; the cold ones the gates find do not
    assert not [op for op in on_cpu.ops if op.stream == "expert_io"]


@pytest.mark.parametrize("policy", ["klotski", "flexgen"])
def test_disk_tier_cold_experts_are_read_on_the_cpu_lane_and_never_copied_to_the_device(policy):
    """A disk-tier expert the CPU computes is read into host memory on the cpu_experts lane (the read the load
    would have made) and computed there: no copy of it to the device, host memory held from the read to the
    call's end."""
    placement = Placement(kv="cpu", experts_gpu=1, experts_cpu=0)  # every other routed expert on disk
    shape = StepShape("decode", 4, 2, 1, 1024, 1088)
    loaded, on_cpu = (build_schedule(policy, MIXTRAL, placement, shape, host=h, num_layers=4)
                      for h in (HostCompute(), HostCompute(experts="all")))
    copied = lambda s: [op for op in s.ops if op.kind == "h2d" and op.tensor in ("expert", "experts")]  # noqa: E731
    assert copied(loaded) and not [op for op in copied(on_cpu) if op.stream != "prefetch" or policy == "flexgen"]
    reads = [op for op in on_cpu.ops if op.kind == "read" and op.stream == "cpu_experts"]
    assert reads and all(op.link == "disk" and op.device == "cpu" and op.mem_alloc == {"cpu": op.bytes}
                         for op in reads)
    calls = {op.id: op for op in on_cpu.ops if op.kind == "experts" and op.device == "cpu"}
    for r in reads:  # each read feeds the CPU call of its layer, which gives the host memory back
        call = next(c for c in calls.values() if r.id in c.deps)
        assert r.expert in call.experts and call.mem_free["cpu"] >= r.bytes
    hw = preset("rtx3090")
    res = simulate(on_cpu, hw, dtype="bfloat16")
    assert res.busy["cpu_experts"] > sum(op_seconds(op, hw) for op in reads)  # the reads, then the call
    assert res.bytes_moved.get("h2d", 0) < simulate(loaded, hw, dtype="bfloat16").bytes_moved["h2d"]


def test_attention_seconds_alone():
    """One layer's decode attention with nothing overlapped: the device side pays the KV copy (its growth in the
    context is the link's time per KV byte plus the device's read), the host side reads the KV in host memory; the
    device's lead shrinks as the context grows, so the comparison flips once."""
    hw = preset("t4")
    kv = MIXTRAL.layers[0].kv_bytes_per_token
    g = [attention_seconds(MIXTRAL, hw, 4, L, "gpu") for L in (1024, 2048)]
    assert g[1] - g[0] == pytest.approx(4 * 1024 * kv * (1 / hw.h2d_bandwidth + 1 / hw.device_mem_bandwidth),
                                        rel=1e-6)
    lead = [attention_seconds(MIXTRAL, hw, 4, L, "cpu") - attention_seconds(MIXTRAL, hw, 4, L, "gpu")
            for L in range(1, 4096, 31)]
    assert lead == sorted(lead, reverse=True) and lead[0] > 0 > lead[-1]
    with pytest.raises(ValueError, match="device must be one of"):
        attention_seconds(MIXTRAL, hw, 4, 16, "tpu")


def _crossover_choices(hw_name: str, policy: str, b: int, grid):
    """Per decode context length L (prompt ``PROMPT``, then generation long enough that the mean decode context
    is L; host memory ample so that the KV cache never pushes experts to disk): the prefill and decode attention
    the searching planner picks, and where the roofline of the same placement puts decode attention (the step
    whose busiest resource is less busy: the KV copy costs link time, CPU attention CPU time), and where one
    layer's attention alone, nothing overlapped, is cheaper."""
    hw = preset(hw_name).with_memory(cpu_memory="2TiB")
    num_hot = MIXTRAL.spec.top_k if policy == "klotski" else None
    out = []
    for L in grid:
        planner = Planner(MIXTRAL, hw, PROMPT, 2 * (L - PROMPT) + 2, host="search")
        plan = planner.evaluate(policy, b, 4, "cpu", num_hot, False)
        dec = {a: planner.simulate(policy, plan.placement, b, 4, num_hot, False,
                                   HostCompute(a, a, plan.host.experts))[1] for a in ("gpu", "cpu")}
        for sim in dec.values():  # the roofline bounds the simulated step from below
            assert sim.roofline <= sim.makespan * (1 + 1e-9)
        roof = "cpu" if dec["cpu"].roofline < dec["gpu"].roofline else "gpu"
        alone = "cpu" if attention_seconds(MIXTRAL, hw, b, L, "cpu") < attention_seconds(MIXTRAL, hw, b, L, "gpu") \
            else "gpu"
        out.append((plan.host.prefill_attn, plan.host.decode_attn, roof, alone))
    return out


PROMPT = 16
GRID = [2 ** i for i in range(4, 16)]  # 16 ... 32768


@pytest.mark.parametrize("hw_name,policy,b,near_roofline", [("t4", "klotski", 1, True),
                                                            ("rtx3090", "klotski", 16, True),
                                                            ("t4", "flexgen", 16, False)])
def test_decode_attention_moves_to_the_cpu_beyond_a_context_length(hw_name, policy, b, near_roofline):
    """Prefill attention stays on the GPU; decode attention moves to the CPU from a context length on and stays
    there, between the two analytic crossovers: no later than the roofline's (wherever copying the KV costs the
    step more link time than reading it in host memory costs CPU time, decode attention is on the CPU) and no
    earlier than the earlier of it and the unpipelined one-layer comparison. (The pipeline sees what neither
    does alone: a KV copy's latency on the way to attention, CPU attention's on the way to the gate.) In the
    klotski order, whose next layer's KV loads all arrive while a layer's experts run, within one grid point
    of the roofline's; FlexGen's two staging buffers leave a KV copy's latency exposed, so it flips earlier."""
    choices = _crossover_choices(hw_name, policy, b, GRID)
    assert all(p == "gpu" for p, _, _, _ in choices)
    decode = [d for _, d, _, _ in choices]
    assert "cpu" in decode
    flip = decode.index("cpu")
    assert decode[flip:] == ["cpu"] * (len(GRID) - flip)  # beyond the crossover it stays on the CPU
    roof = [r for _, _, r, _ in choices]
    alone = [a for _, _, _, a in choices]
    assert "cpu" in roof and "cpu" in alone
    assert min(roof.index("cpu"), alone.index("cpu")) <= flip <= roof.index("cpu")
    assert all(d == "cpu" for d, r in zip(decode, roof) if r == "cpu")
    if near_roofline:
        assert flip >= roof.index("cpu") - 1


@pytest.mark.parametrize("policy,n,buffers", [("klotski", 4, 4), ("flexgen", 4, 2), ("klotski", 1, 2)])
def test_kv_loads_take_the_staging_buffers_the_runtime_frees(policy, n, buffers):
    """Over a host KV cache with attention on the device, KV loads take the staging buffers in load order, as the
    runtime's pool grants them: each waits for the store of the load ``buffers`` before it, and never more
    than ``buffers`` are held at once in the simulated step. The klotski order has one per micro-batch and
    issues the next layer's loads once a layer's gates have run, before its experts: they arrive while the
    experts run, and only the first micro-batch's attention of a layer waits for nothing but the layer
    before."""
    from klotski.program.pools import kv_staging_buffers

    assert kv_staging_buffers(policy, n) == buffers
    layers = 4
    shape = StepShape("decode", 8, n, 1, 2048, 2112)
    sched = build_schedule(policy, MIXTRAL, Placement(kv="cpu", experts_gpu=1), shape,
                           num_hot=MIXTRAL.spec.top_k if policy == "klotski" else None, overlap=policy == "flexgen",
                           num_layers=layers)
    loads = [op for op in sched.ops if op.kind == "kv_load"]
    store = {(op.layer, op.batch): op for op in sched.ops if op.kind == "kv_store"}
    assert [(op.layer, op.batch) for op in loads] == [(i, k) for i in range(layers) for k in range(n)]
    for j, op in enumerate(loads):
        if j >= buffers:
            prev = loads[j - buffers]
            assert store[(prev.layer, prev.batch)].id in op.deps
    res = simulate(sched, preset("t4"), dtype="bfloat16")
    held = sorted([(res.start[op.id], 1) for op in loads] + [(res.finish[op.id], -1) for op in store.values()])
    in_flight = [sum(d for _, d in held[:i + 1]) for i in range(len(held))]
    assert max(in_flight) <= buffers
    if policy == "klotski" and n > 1:
        first_expert = {}
        for op in sched.ops:
            if op.kind in ("experts", "expert") and op.device == "gpu":
                first_expert.setdefault(op.layer, op.id)
        assert all(op.id < first_expert[op.layer - 1] for op in loads if op.layer > 0 and op.batch > 0)


@pytest.mark.parametrize("policy", ["flexgen", "klotski"])
def test_searching_host_compute_never_predicts_slower(policy):
    """The search starts where the device-only search ends (same grid, same climb), then climbs with host compute:
    its plan is never predicted slower; on the L4 preset decode attention goes to the CPU under klotski."""
    hw = preset("l4")
    off = Planner(MIXTRAL, hw, 512, 256, host="off").plan(policy)
    found = Planner(MIXTRAL, hw, 512, 256, host="search").plan(policy)
    assert found.tokens_per_s >= off.tokens_per_s * (1 - 1e-9)
    assert off.host == HostCompute()
    if policy == "klotski":
        assert found.host.decode_attn == "cpu" and found.host.prefill_attn == "gpu"
        assert "attention prefill=gpu decode=cpu" in found.describe(MIXTRAL.spec.num_experts)  # klotski plan
        assert found.tokens_per_s > 1.1 * off.tokens_per_s


def test_klotski_keeps_a_staging_buffer_per_micro_batch_while_memory_allows():
    """Over a host KV cache the placement keeps klotski's staging buffer per micro-batch where they fit beside
    everything else (T4, 64 x 4 sequences, mean context 256), and falls back to two where four would not fit
    (mean context 8192: a buffer of the cache's capacity is 4 GiB); FlexGen's order always has two."""
    hw = preset("t4").with_memory(cpu_memory="2TiB")

    def placed(policy, L):
        planner = Planner(MIXTRAL, hw, PROMPT, 2 * (L - PROMPT) + 2)
        num_hot = MIXTRAL.spec.top_k if policy == "klotski" else None
        p = planner.place(policy, 64, 4, "cpu", num_hot, False, HostCompute())
        plan = planner.score(policy, p, 64, 4, num_hot, False, HostCompute())
        assert planner.fits(plan)
        return p

    assert placed("klotski", 256).kv_buffers is None  # the order's own: one per micro-batch
    assert placed("klotski", 8192).kv_buffers == 2
    assert placed("flexgen", 8192).kv_buffers is None  # (its own number is two)


def test_host_compute_settings_parse_from_text():
    assert parse_host_compute("auto") == "auto" and parse_host_compute(" OFF ") == "off"
    assert parse_host_compute("decode=cpu") == HostCompute(decode_attn="cpu")
    assert parse_host_compute("prefill=cpu, decode=cpu,experts=all") == HostCompute("cpu", "cpu", "all")
    fixed = HostCompute(experts="auto")
    assert parse_host_compute(fixed) is fixed
    for bad, match in (("decode=tpu", "decode_attn must be one of"), ("decode", "could not read 'decode'"),
                       ("attn=cpu", "could not read 'attn=cpu'"), ("decode=cpu,decode=gpu", "each once"),
                       ("", "could not read ''")):
        with pytest.raises(ValueError, match=match):
            parse_host_compute(bad)
    with pytest.raises(ValueError, match="got int 3"):
        parse_host_compute(3)


def test_no_cpu_experts_searched_when_the_host_copies_are_quantized():
    """int4 / fp8 host copies are not computed from on the CPU (the runtime turns "auto" off): the planner then
    searches attention only and plans a fixed "auto" as "off", so its plan is the one that runs. On Fiddler's
    profile at batch 1, where the CPU wins every cold expert, the same candidate otherwise takes "auto"."""
    hw = replace(fiddler_profile(MIXTRAL), gpu_memory=24 << 30, cpu_memory=1 << 40)
    found = {}
    for plain in (True, False):
        planner = Planner(MIXTRAL, hw, 64, 8, host="search", host_experts=plain)
        found[plain] = planner.evaluate("klotski", 1, 1, "gpu", 2, False)
        assert found[plain] is not None
        fixed = Planner(MIXTRAL, hw, 64, 8, host=HostCompute(experts="auto"), host_experts=plain)
        assert fixed.fixed_host("klotski", "gpu").experts == ("auto" if plain else "off")
    assert found[True].host.experts == "auto" and found[False].host.experts == "off"
    assert found[True].tokens_per_s > found[False].tokens_per_s


def test_quantized_runs_plan_without_cpu_experts():
    from klotski.presets import model_config
    from klotski.model.spec import ModelSpec
    from klotski.runtime.planning import host_experts_computable

    spec = ModelSpec.from_config(model_config("mixtral-8x7b"))
    assert host_experts_computable(spec, None)
    assert not host_experts_computable(spec, "int4")
    assert not host_experts_computable(replace(spec, fp8_block=(128, 128)), None)
