"""The runtime plans from klotski.planner; loose ends: V3 router bias in fp32, prefetch warm-up and table."""
import os

import pytest
import torch

from klotski import LLM, SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_auto_uses_the_plan_and_predicts(checkpoints, tmp_path):
    path, _ = checkpoints.get("mixtral")
    ref = [o.token_ids for o in LLM(path, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    llm = LLM(path, device="cpu", policy="klotski", gpu_memory="900KiB", cpu_memory="300KiB",
              offload_dir=str(tmp_path / "off"))
    ex = llm.executor
    assert (ex.num_batches, ex.batch_size) == (ex.plan.n, ex.plan.batch_size)
    assert ex.layout.placement.kv == ex.plan.placement.kv
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    m = llm.metrics.extra
    assert out == ref
    assert m["predicted_tokens_per_s"] > 0 and m["planned_tokens_per_s"] > 0
    # warm-up recorded the table, the run saved it in offload_dir; a new LLM reloads it (no warm-up)
    table = tmp_path / "off" / "klotski_prefetch.npz"
    assert "warmup_s" in m and table.is_file()
    assert 0.0 <= m["prefetch_precision"] <= 1.0 and 0.0 <= m["prefetch_recall"] <= 1.0
    llm.close()
    llm2 = LLM(path, device="cpu", policy="klotski", gpu_memory="900KiB", cpu_memory="300KiB",
               offload_dir=str(tmp_path / "off"))
    assert llm2.executor.prefetcher.popularity.sum() > 0
    out2 = [o.token_ids for o in llm2.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    assert out2 == ref and "warmup_s" not in llm2.metrics.extra
    llm2.close()


def test_flexgen_no_streaming_slots_when_all_resident(checkpoints):
    path, _ = checkpoints.get("mixtral")
    llm = LLM(path, device="cpu", policy="flexgen", num_batches=2, batch_size=2)
    lay = llm.executor.layout
    assert lay.placement.experts_gpu >= llm.spec.num_experts and lay.expert_slots == 0
    llm.close()


def test_v3_router_bias_fp32_bf16_routes_like_resident(checkpoints, tmp_path):
    path, _ = checkpoints.get("deepseek_v3")
    ref_llm = LLM(path, device="cpu", dtype="bfloat16")
    ref = [o.token_ids for o in ref_llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    for gpu in (None, "2MiB"):  # router resident, and (tight budget) streamed through a dense buffer
        llm = LLM(path, device="cpu", dtype="bfloat16", policy="klotski", gpu_memory=gpu, cpu_memory="1GiB",
                  offload_dir=str(tmp_path / f"off{gpu}"), num_batches=2, batch_size=2)
        ex = llm.executor
        layer = ex.spec.moe_layers[0]
        w = ex.w.resident[layer]
        if "router_bias" in w:
            assert w["router_bias"].dtype == torch.float32
        else:
            assert ex.w.buffer_dtype("router_bias") == torch.float32
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        llm.close()
        assert out == ref, gpu


def test_disk_loads_calibrate_as_read_then_copy(checkpoints, tmp_path):
    """A load from disk is traced as its read (the seconds spent waiting on the reader) and the copy out of the
    staging ring, the two ops the schedule models; calibrating on the run fits both links from them."""
    from klotski.hardware import preset
    from klotski.runtime.planning import calibrate_from_run

    path, _ = checkpoints.get("mixtral")
    llm = LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2,
              batch_size=2)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    ex = llm.executor
    spans = [sp for sp in ex.tracer.spans if sp[4].get("tier") in ("disk", "store")]
    assert spans and all(0 < sp[4]["read_s"] <= sp[3] - sp[2] for sp in spans)
    assert sum(sp[4]["read_bytes"] for sp in spans) == ex.w.counters.get("disk_read")
    obs = ex.tracer.observations()
    reads = [(op, s) for op, s in obs if op.link == "disk"]
    assert len(reads) == len(spans) and sum(op.bytes for op, _ in reads) == ex.w.counters.get("disk_read")
    hw = preset("rtx3090")
    cal = calibrate_from_run(ex, hw, save=False)
    measured = sum(op.bytes for op, _ in reads) / sum(s for _, s in reads)
    latency = hw.transfer_latency_s * len(reads)  # the fit keeps the latency term: compare rates loosely
    assert cal.disk_bandwidth == pytest.approx(
        sum(op.bytes for op, _ in reads) / (sum(s for _, s in reads) - latency), rel=1e-6)
    assert cal.disk_bandwidth != hw.disk_bandwidth and measured > 0
    llm.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_olmoe_fused_budget_runs_or_is_refused_when_planning(checkpoints, tmp_path, dtype):
    """OLMoE with fused expert keys, klotski, gpu 0.65x / cpu 0.35x of the checkpoint: either the plan runs
    within its budgets (the resident engine's tokens), or it is refused before anything runs, naming the
    minimum budgets, and those minimum budgets then run."""
    from klotski.runtime import BudgetError

    path, _ = checkpoints.get("olmoe", dtype=dtype, fused=True)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    with LLM(path, device="cpu") as ref_llm:
        ref = [o.token_ids for o in ref_llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]

    def run(gpu: int, cpu: int):
        with LLM(path, device="cpu", policy="klotski", gpu_memory=gpu, cpu_memory=cpu,
                 offload_dir=str(tmp_path / f"off-{gpu}")) as llm:
            out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            m = llm.metrics.extra
        assert out == ref
        assert m["peak_gpu_bytes"] <= gpu and m["peak_cpu_bytes"] <= cpu

    gpu, cpu = int(0.65 * size), int(0.35 * size)
    try:
        run(gpu, cpu)
    except BudgetError as e:
        assert e.min_gpu_memory > 0 and "needs GPU >=" in str(e), e
        run(max(gpu, e.min_gpu_memory), max(cpu, e.min_cpu_memory))
