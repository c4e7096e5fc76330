"""Host compute in the planner: Fiddler's cold-expert rule from its own constants, monotone in the token count;
the simulator prices CPU attention and CPU experts on their own lanes without KV copies; on the T4 and RTX 3090
presets with Mixtral-8x7B the planner keeps prefill attention on the GPU and moves decode attention to the CPU
once the context is long, and stays there."""
from dataclasses import replace

import pytest

from klotski.costs import ModelCosts
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.presets import model_config
from klotski.program.host import ExpertRule, HostCompute, fiddler_rule
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


def _crossover_choices(hw_name: str, b: int, grid):
    """Prefill / decode attention the searching planner picks per decode context length L (prompt 512, then
    generation long enough that the mean decode context is L), the placement search included (host memory
    ample so that the KV cache never pushes experts to disk)."""
    hw = preset(hw_name).with_memory(cpu_memory="2TiB")
    out = []
    for L in grid:
        planner = Planner(MIXTRAL, hw, PROMPT, 2 * (L - PROMPT) + 2, host="search")
        plan = planner.evaluate("klotski", b, 4, "cpu", MIXTRAL.spec.top_k, False)
        out.append((plan.host.prefill_attn, plan.host.decode_attn))
    return out


PROMPT = 512
GRID = [2 ** i for i in range(9, 16)]  # 512 ... 32768


@pytest.mark.parametrize("hw_name,b", [("t4", 1), ("rtx3090", 16)])
def test_decode_attention_moves_to_the_cpu_beyond_a_context_length(hw_name, b):
    """(batch sizes where the crossover falls inside the grid: with larger batches the KV copy outweighs the
    CPU path already at 512)"""
    choices = _crossover_choices(hw_name, b, GRID)
    assert all(p == "gpu" for p, _ in choices)  # prefill: attention stays on the GPU
    decode = [d for _, d in choices]
    assert decode[0] == "gpu" and decode[-1] == "cpu"
    flip = decode.index("cpu")
    assert decode[flip:] == ["cpu"] * (len(GRID) - flip)  # beyond the crossover it stays on the CPU


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
