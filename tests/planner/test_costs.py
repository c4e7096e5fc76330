import pytest

from klotski import model as kmodel
from klotski.calibration import calibrate, fit_compute
from klotski.costs import ModelCosts, op_seconds, weight_dtype_of
from klotski.hardware import PRESETS, preset
from klotski.presets import MODEL_CONFIGS, model_config
from klotski.schedule import Op

GQA_MODELS = ["mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b"]
DEEPSEEK = ["deepseek-v2-lite", "deepseek-v3"]
needs_deepseek = pytest.mark.skipif("deepseek_v2" not in kmodel.PARSERS, reason="deepseek_v2 parser not registered")


def test_mixtral_8x7b_bytes_match_design_numbers():
    c = ModelCosts.from_config(model_config("mixtral-8x7b"))
    lc = c.layers[0]
    assert lc.expert_bytes == 3 * 4096 * 14336 * 2  # ~352 MB: one Mixtral-8x7B expert in bf16
    assert lc.num_experts * lc.expert_bytes == pytest.approx(2.82e9, rel=0.01)
    assert lc.attn_bytes == (4096 * (4096 + 2 * 1024) + 4096 * 4096) * 2
    assert lc.gate_bytes == 4096 * 8 * 2
    assert lc.kv_bytes_per_token == 2 * 8 * 128 * 2
    assert c.total_bytes == pytest.approx(93.4e9, rel=0.01)  # 46.7B parameters in bf16


@pytest.mark.parametrize("name", GQA_MODELS)
def test_builtin_gqa_models_parse(name):
    c = ModelCosts.from_config(model_config(name), name=name)
    assert c.num_layers == MODEL_CONFIGS[name]["num_hidden_layers"]
    assert all(lc.expert_bytes > 0 for lc in c.layers if lc.kind == "moe")


def test_total_params_of_known_models():
    # public parameter counts: Qwen3-30B-A3B 30.5B, OLMoE 6.9B, Qwen1.5-MoE 14.3B, Mixtral-8x22B 141B
    for name, params in [("qwen3-30b-a3b", 30.5e9), ("olmoe-1b-7b", 6.9e9), ("qwen1.5-moe-a2.7b", 14.3e9),
                         ("mixtral-8x22b", 141e9)]:
        c = ModelCosts.from_config(model_config(name))
        assert c.total_bytes / 2 == pytest.approx(params, rel=0.03), name


@needs_deepseek
@pytest.mark.parametrize("name", DEEPSEEK)
def test_builtin_deepseek_models_parse(name):
    cfg = model_config(name)
    c = ModelCosts.from_config(cfg, name=name)
    spec = c.spec
    assert spec.attention == "mla"
    assert c.layers[0].kind == "dense" and c.layers[-1].kind == "moe"
    assert c.layers[-1].kv_bytes_per_token == (spec.kv_lora_rank + spec.qk_rope_head_dim) * 2
    assert c.layers[-1].shared_bytes == cfg["n_shared_experts"] * c.layers[-1].expert_bytes // (
        1 if c.weight_dtype != "float8_e4m3" else 1)


@needs_deepseek
def test_deepseek_v3_size_and_mla_flops():
    cfg = model_config("deepseek-v3")
    assert weight_dtype_of(cfg) == "float8_e4m3"
    c = ModelCosts.from_config(cfg)
    # 671B parameters (+ the MTP layer, not modelled); fp8 weights, bf16 embeddings counted at 1 byte here
    assert c.total_bytes == pytest.approx(671e9, rel=0.03)
    spec = c.spec
    proj, score, kv = c.attn_flops(10, seqs=1, q_len=1, past_len=99)
    # absorbed decode: scores over the latent, per head (2 * kv_lora + rope) per key
    assert score == pytest.approx(2 * 100 * spec.num_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim))
    assert kv == 100 * (spec.kv_lora_rank + spec.qk_rope_head_dim) * 2
    lite = ModelCosts.from_config(model_config("deepseek-v2-lite"))
    assert lite.total_bytes / 2 == pytest.approx(15.7e9, rel=0.03)


def test_attention_flops_gqa():
    c = ModelCosts.from_config(model_config("mixtral-8x7b"))
    proj, score, kv = c.attn_flops(0, seqs=2, q_len=1, past_len=9)
    assert proj == 2 * 2 * c.layers[0].attn_params
    assert score == 2 * 2 * 10 * 32 * 2 * 128
    assert kv == 2 * 10 * 4096
    _, score_prefill, _ = c.attn_flops(0, seqs=1, q_len=4, past_len=0)
    assert score_prefill == 2 * 4 * 2.5 * 32 * 2 * 128  # causal: mean key count (4 + 1) / 2


def test_op_seconds_and_calibration():
    hw = preset("rtx3090")
    copy = Op(0, "h2d", "prefetch", "gpu", 0, link="h2d", bytes=24 * 10**9)
    assert op_seconds(copy, hw) == pytest.approx(1.0 + hw.transfer_latency_s)
    mm = Op(1, "expert", "compute", "gpu", 0, flops=hw.matmul_flops["bfloat16"], calls=1)
    assert op_seconds(mm, hw) == pytest.approx(1.0 + hw.op_overhead_s)
    # the copy took its latency plus twice its transfer time: half the bandwidth, the latency as profiled
    slow = calibrate(hw, [(copy, 2.0 + hw.transfer_latency_s), (mm, 4.0 * op_seconds(mm, hw))])
    assert slow.h2d_bandwidth == pytest.approx(hw.h2d_bandwidth / 2)
    assert op_seconds(copy, slow) == pytest.approx(2.0 + hw.transfer_latency_s)
    assert slow.matmul_flops["bfloat16"] == pytest.approx(hw.matmul_flops["bfloat16"] / 4)
    assert slow.d2h_bandwidth == hw.d2h_bandwidth and "calibrated" in slow.source


def test_calibration_separates_per_call_overhead_from_rate():
    """Ops of several sizes timed as calls * 1 ms + flops / 80 GFLOP/s: the fit recovers both terms, so it
    predicts a much larger (prefill-sized) op correctly, which a rate-only rescale would not."""
    hw = preset("rtx3090")
    true_overhead, true_rate, true_attn = 1e-3, 80e9, 20e9
    ops = [Op(i, "expert", "compute", "gpu", 0, flops=f, calls=c)
           for i, (f, c) in enumerate([(1e6, 1), (5e6, 3), (2e7, 2), (4e7, 5), (1e8, 1)])]
    ops += [Op(10 + i, "attn", "compute", "gpu", 0, flops=f, score_flops=sf, calls=2)
            for i, (f, sf) in enumerate([(1e6, 1e6), (3e6, 8e6), (1e7, 2e6)])]

    def measured(op):
        return op.calls * true_overhead + op.flops / true_rate + op.score_flops / true_attn

    fit = calibrate(hw, [(op, measured(op)) for op in ops])
    assert fit.op_overhead_s == pytest.approx(true_overhead, rel=1e-6)
    assert fit.matmul_flops["bfloat16"] == pytest.approx(true_rate, rel=1e-6)
    assert fit.attention_flops == pytest.approx(true_attn, rel=1e-6)
    big = Op(99, "expert", "compute", "gpu", 0, flops=5e10, calls=1)
    assert op_seconds(big, fit) == pytest.approx(measured(big), rel=1e-6)
    assert fit.h2d_bandwidth == hw.h2d_bandwidth  # no copies observed: untouched


def test_ffn_workspace_is_chunked_like_the_kernels():
    """The activation estimate bounds the FFN workspace by one chunk of tokens, the chunk fused_moe runs."""
    from klotski.costs import FFN_CHUNK_TOKENS
    from klotski.triton_kernels import CHUNK_TOKENS, workspace_bytes

    assert FFN_CHUNK_TOKENS == CHUNK_TOKENS
    c = ModelCosts.from_config(model_config("mixtral-8x7b"))
    s = c.spec
    assert c.ffn_workspace_bytes(100) == workspace_bytes(100, s.top_k, s.hidden_size, s.moe_intermediate_size, 2)
    big = c.ffn_workspace_bytes(10 * FFN_CHUNK_TOKENS)
    assert big == c.ffn_workspace_bytes(FFN_CHUNK_TOKENS)
    # a prefill of 96 sequences x 512 tokens: hidden states grow with the tokens, the FFN workspace does not
    assert c.activation_bytes(96, 6, 512, 512) - c.activation_bytes(48, 6, 512, 512) < 48 * 512 * s.hidden_size * 40


def test_calibration_falls_back_to_a_smaller_positive_model():
    """When the full fit gives a non-positive term (here attention FLOPs that seem to cost negative time), the
    fit drops to score FLOPs at the matmul rate instead of giving up and keeping the profile's overhead."""
    rows = []
    for i, (calls, flops, score) in enumerate([(1, 1e6, 0), (3, 5e6, 2e5), (2, 2e7, 0), (5, 4e7, 1e6),
                                               (1, 1e8, 0), (2, 3e6, 3e6), (4, 6e7, 5e5)]):
        seconds = calls * 1e-3 + (flops + score) / 80e9 - score / 2e10  # the score term pulls the wrong way
        rows.append((calls, flops, score, seconds))
    overhead, rate, attn = fit_compute(rows)
    assert overhead > 0 and rate > 0 and attn == rate  # the merged model
    assert overhead == pytest.approx(1e-3, rel=0.3) and rate == pytest.approx(80e9, rel=0.3)
    assert fit_compute([(1, 1e6, 0, 1e-3)]) is None  # one row cannot separate anything


def test_calibration_separates_weight_reads_from_per_call_overhead():
    """A run of gates (one call, few bytes), decode experts (a call per expert, each reading its weights) and
    prefill experts (FLOPs), timed as calls * 0.1 ms + flops / 40 GFLOP/s + bytes / 3 GB/s: with the bytes the
    ops read, the fit recovers all three terms and prices every op within 2x of its time; without them, the
    per-call overhead absorbs the experts' weight reads and a gate is priced many times its time."""
    from dataclasses import replace

    hw = replace(preset("rtx3090"), device="cpu")
    overhead, rate, bw, expert_bytes = 1e-4, 40e9, 3e9, 9_437_184

    def op(i, kind, calls, flops, nbytes):
        return Op(i, kind, "compute", "gpu", 0, flops=flops, calls=calls, bytes=nbytes)

    ops = [op(i, "gate", 1, 2e4 * (1 + i % 4), 16_384 + 4096 * (i % 4)) for i in range(20)]
    ops += [op(20 + i, "experts", 1 + i % 4, 2e7 * (1 + i % 3), (1 + i % 4) * expert_bytes) for i in range(20)]
    ops += [op(40 + i, "experts", 1 + i % 3, 2e9 * (1 + i % 2), (1 + i % 3) * expert_bytes) for i in range(10)]

    def measured(o):
        return o.calls * overhead + o.flops / rate + o.bytes / bw

    fit = calibrate(hw, [(o, measured(o)) for o in ops], dtype="float32")
    assert fit.op_overhead_s == pytest.approx(overhead, rel=1e-3)
    assert fit.matmul_flops["float32"] == pytest.approx(rate, rel=1e-3)
    assert fit.device_mem_bandwidth == pytest.approx(bw, rel=1e-3)
    assert all(0.5 <= measured(o) / op_seconds(o, fit, "float32") <= 2.0 for o in ops)
    # CPU mode: the device is the CPU, so its CPU-side fields are the same fit
    assert fit.cpu_op_overhead_s == fit.op_overhead_s and fit.cpu_mem_bandwidth == fit.device_mem_bandwidth
    assert fit.cpu_matmul_flops == fit.matmul_flops
    # each kind's own costs (fit_kind_costs): the gates' per call is the overhead they were timed with
    assert fit.kind_costs["gate"][0] == pytest.approx(overhead, rel=0.05)
    blind = calibrate(hw, [(replace(o, bytes=0), measured(o)) for o in ops], dtype="float32")
    generic = replace(blind, kind_costs={}, cpu_kind_costs={})  # one overhead for every op
    assert not all(0.5 <= measured(o) / op_seconds(replace(o, bytes=0), generic, "float32") <= 2.0 for o in ops)


def test_each_op_kind_gets_its_own_fixed_costs():
    """CPU mode's eager torch: a decode attention op runs ~40 kernels, the MLP's closing residual add one, so
    their fixed costs differ 40x; a gate's normed input makes several passes over its hidden rows, which the
    roofline prices once. One per-call overhead for every op cannot price all three within 2x; the per-kind
    seconds per call and per token calibration fits after it (fit_kind_costs) price each op within 10 %,
    presets have none, and the fitted tables survive the profile's JSON."""
    from dataclasses import replace

    from klotski.calibration import fit_kind_costs
    from klotski.hardware import HardwareProfile

    hw = replace(preset("rtx3090"), device="cpu")
    assert all(not p.kind_costs and not p.cpu_kind_costs for p in PRESETS.values())
    rate = 50e9
    fixed = {"attn": (0.8e-3, 0.0), "shared": (0.02e-3, 0.0), "experts": (0.1e-3, 0.0), "gate": (0.05e-3, 0.5e-6)}
    ops = [Op(i, "attn", "compute", "gpu", 0, flops=1e6 * (1 + i % 5), tokens=4) for i in range(30)]
    ops += [Op(30 + i, "shared", "compute", "gpu", 0, flops=1e4 * (1 + i % 3), tokens=4) for i in range(30)]
    ops += [Op(60 + i, "experts", "compute", "gpu", 0, flops=5e7 * (1 + i % 4), calls=1 + i % 2, tokens=8)
            for i in range(30)]
    ops += [Op(90 + i, "gate", "compute", "gpu", 0, flops=40 * t, tokens=t) for i, t in enumerate([4, 1024] * 10)]

    def measured(o):
        per_call, per_token = fixed[o.kind]
        return o.calls * per_call + o.tokens * per_token + o.flops / rate

    obs = [(o, measured(o)) for o in ops]
    fit = calibrate(hw, obs, dtype="float32")
    generic = replace(fit, kind_costs={}, cpu_kind_costs={})
    missed = {o.kind for o in ops if not 0.5 <= measured(o) / op_seconds(o, generic, "float32") <= 2.0}
    assert len(missed) >= 2  # one overhead: kinds miss by more than 2x
    assert all(0.5 <= measured(o) / op_seconds(o, fit, "float32") <= 2.0 for o in ops)
    # the kinds whose fixed costs dominate: within 10 % (the experts' FLOP rate is the joint fit's, which the
    # attention ops' fixed costs pull down)
    assert all(abs(measured(o) / op_seconds(o, fit, "float32") - 1) < 0.1 for o in ops if o.kind != "experts")
    assert fit.kind_costs["gate"][1] == pytest.approx(0.5e-6, rel=0.1)  # the per-token term of the gate's rows
    assert fit.cpu_kind_costs == fit.kind_costs  # CPU mode: one processor
    assert HardwareProfile.from_dict(fit.to_dict()) == fit
    # a kind timed fewer than MIN_KIND_OPS times keeps the generic overhead
    few = fit_kind_costs(fit, obs[:5] + obs[30:], "float32")
    assert "attn" not in few.kind_costs and "shared" in few.kind_costs
    # ops with neither tokens nor FLOPs (half of them): the per-call term alone, and no failed fit
    bare = [Op(200 + i, "attn_out", "compute", "gpu", 0, tokens=(i % 2) * 4) for i in range(10)]
    got = fit_kind_costs(fit, [(o, 1e-4) for o in bare], "float32")
    assert got.kind_costs["attn_out"][0] == pytest.approx(1e-4, rel=0.05)


def test_cpu_mode_fits_how_much_a_lane_beside_an_op_slows_it():
    """CPU mode runs every lane on the same cores: an op's fixed costs grow while another lane runs beside it
    (here 1.6x: contention 0.6). Kinds timed both alone and beside a lane identify it; a kind timed only
    beside one (the gate of a run whose KV copies always overlap it) is then priced alone at its own cost,
    not at the contended one; every op within 10 % (the experts' FLOP rate is the joint fit's). The generic
    overhead (kinds not fitted apart) and a GPU's profile have no contention."""
    from dataclasses import replace

    from klotski.calibration import CONTENTION_GRID, fit_kind_costs
    from klotski.hardware import HardwareProfile

    hw = replace(preset("rtx3090"), device="cpu")
    rate, slow = 50e9, 0.6
    fixed = {"attn": 0.8e-3, "expert": 0.1e-3, "gate": 0.2e-3}
    ops = [Op(i, "attn", "compute", "gpu", 0, flops=1e6 * (1 + i % 5), tokens=4, contended=(i % 3) / 2)
           for i in range(30)]
    ops += [Op(30 + i, "expert", "compute", "gpu", 0, flops=5e7 * (1 + i % 4), tokens=8, contended=i % 2)
            for i in range(30)]
    ops += [Op(60 + i, "gate", "compute", "gpu", 0, flops=4e4, tokens=4, contended=1.0) for i in range(20)]

    def measured(o, contended=None):
        share = o.contended if contended is None else contended
        return fixed[o.kind] * (1 + slow * share) + o.flops / rate

    obs = [(o, measured(o)) for o in ops]
    fit = calibrate(hw, obs, dtype="float32")
    assert fit.contention == pytest.approx(slow) and slow in CONTENTION_GRID
    for o in ops:
        for share in (0.0, 1.0):
            assert op_seconds(o, fit, "float32", share) == pytest.approx(measured(o, share), rel=0.1)
    blind = fit_kind_costs(hw, [(replace(o, contended=0.0), s) for o, s in obs], "float32")
    assert blind.contention == 0.0
    gate = replace(ops[-1], contended=0.0)
    assert op_seconds(gate, blind, "float32") / measured(gate) > 1.5  # priced at its contended time
    assert op_seconds(Op(0, "lm_head", "compute", "gpu", 0, calls=2), fit, "float32", 1.0) == pytest.approx(
        2 * fit.op_overhead_s)  # the generic overhead: the calibration run's average, no contention on top
    on_gpu = fit_kind_costs(preset("rtx3090"), obs, "float32")
    assert on_gpu.contention == 0.0
    assert op_seconds(ops[0], replace(fit, device="cuda"), "float32") == pytest.approx(
        op_seconds(ops[0], fit, "float32", 0.0))  # a GPU's ops: no contention
    assert HardwareProfile.from_dict(fit.to_dict()) == fit
