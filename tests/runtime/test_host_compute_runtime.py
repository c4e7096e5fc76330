"""Host compute in the runtime (CPU mode): attention on the CPU over the host KV cache and cold experts computed
on the CPU from their host copies give the resident engine's greedy tokens and logits (fp32, 1e-5 relative) for
every architecture under every offloaded policy; the lanes run the builder's ops (replayed from the recorded
routing); the trace has no KV-load span when attention runs on the CPU; the rule's "auto" mode runs too."""
import re
from functools import partialmethod

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.program.host import HostCompute
from klotski.runtime import OffloadedSession
from klotski.runtime.interpreter import StepInterpreter
from tests.runtime.test_op_program import check_steps

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
FORCED = HostCompute(prefill_attn="cpu", decode_attn="cpu", experts="all")
FIXED = preset("rtx3090")
_REFS: dict = {}


def reference(checkpoints, arch):
    if arch not in _REFS:
        path, _ = checkpoints.get(arch)
        with LLM(path, device="cpu") as llm:
            toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            _REFS[arch] = (path, toks, llm.logits(PROMPTS))
    return _REFS[arch]


def run(path, policy, host, gpu_memory="700KiB", record=False, monkeypatch=None, hardware=FIXED):
    """``hardware``: the profile the plan is made on; a fixed one by default, so which experts klotski prefetches
    (and so which cold ones the host computes) does not depend on the machine running the test."""
    if record:
        monkeypatch.setattr(StepInterpreter, "__init__", partialmethod(StepInterpreter.__init__, record=True))
    with LLM(path, device="cpu") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, policy, gpu_memory, None,
                                       None, num_batches=2, batch_size=2, kv="cpu", host_compute=host,
                                       hardware=hardware)
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        spans = {s[0] for s in llm.executor.tracer.spans}
        logits = llm.logits(PROMPTS)
        runner, ex = llm.executor.runner, llm.executor
        host_experts = ex.layout.placement.experts_on("cpu", llm.spec.num_experts) if llm.spec.moe_layers else 0
    if record:
        monkeypatch.undo()
    return toks, logits, spans, runner, host_experts


def rel(a, b):
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("policy", ["layerwise", "flexgen", "klotski"])
@pytest.mark.parametrize("arch", ARCHS)
def test_host_compute_is_exact(checkpoints, arch, policy):
    path, ref_toks, ref_logits = reference(checkpoints, arch)
    toks, logits, spans, _, host_experts = run(path, policy, FORCED)
    assert toks == ref_toks
    assert rel(logits, ref_logits) < 1e-5
    assert "cpu_attn" in spans and not spans & {"kv_load", "kv_store"}  # no KV crosses the link
    assert host_experts > 0
    if policy != "klotski":  # (klotski prefetches its hot experts; only the cold ones are computed on the host)
        assert "cpu_experts" in spans


@pytest.mark.parametrize("policy", ["flexgen", "klotski"])
def test_host_lanes_run_the_builders_ops(checkpoints, monkeypatch, policy):
    """(klotski plans its paper variant here, top_k hot experts per layer: its wide variant may prefetch every
    routed expert of this tiny model, and then no cold expert is left for the host lane to run)"""
    path, ref_toks, _ = reference(checkpoints, "mixtral")
    paper = Planner.variants
    monkeypatch.setattr(Planner, "variants",
                        lambda self, pol: [v for v in paper(self, pol) if pol != "klotski" or v[1] is False])
    toks, _, spans, runner, _ = run(path, policy, FORCED, record=True, monkeypatch=monkeypatch)
    assert toks == ref_toks
    check_steps(runner)  # the replayed builder's ops == what each lane executed, host lanes included
    lanes = {lane for step in runner.steps for lane, _ in step["lanes"]}
    assert {"cpu_attn", "cpu_experts"} <= lanes and "kv_load" not in lanes


@pytest.mark.parametrize("policy", ["flexgen", "klotski"])
def test_traced_costs_are_the_builders_ops_and_count_the_calls_that_ran(checkpoints, monkeypatch, policy):
    """Every compute span carries the cost of the builder's ops it ran (what calibration and the per-op bench
    price); the CPU expert op's calls are the expert calls the host lane makes (one per expert), and a device
    expert op's calls are the experts its grouped call computes."""
    import klotski.runtime.compute as compute_mod

    paper = Planner.variants  # klotski's paper variant: its wide one may prefetch every expert (see above)
    monkeypatch.setattr(Planner, "variants",
                        lambda self, pol: [v for v in paper(self, pol) if pol != "klotski" or v[1] is False])
    calls = []
    real = compute_mod.fused_moe_torch
    monkeypatch.setattr(compute_mod, "fused_moe_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    path, ref_toks, _ = reference(checkpoints, "mixtral")
    with LLM(path, device="cpu") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, policy, "700KiB", None,
                                       None, num_batches=2, batch_size=2, kv="cpu", host_compute=FORCED,
                                       hardware=FIXED)
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)  # (includes the session's untraced warm-up)
        llm.session.reset_metrics()
        calls.clear()
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        spans = list(llm.executor.tracer.spans)
        observed = llm.executor.tracer.observations()
    assert toks == ref_toks
    compute = [s for s in spans if s[0] in ("compute", "cpu_attn", "cpu_experts") and "op" in s[4]]
    assert compute and all("cost" in s[4] for s in compute)
    host = [s[4]["cost"] for s in compute if s[0] == "cpu_experts"]
    assert host and all(c["kind"] == "experts" and c["device"] == "cpu" for c in host)
    assert sum(c["calls"] for c in host) == len(calls)  # one fused_moe_torch call per host expert
    for stream, _, _, _, args in compute:
        if stream == "compute" and args["op"] == "experts":
            assert args["cost"]["calls"] == max(1, args["experts"])  # the experts the grouped call computed
    attn = [s[4]["cost"] for s in compute if s[0] == "cpu_attn"]
    assert attn and all(c["kind"] == "attn_core" and c["device"] == "cpu" and c["bytes"] > 0 for c in attn)
    on_cpu = [op for op, _ in observed if op.link is None and op.device == "cpu"]
    assert len(on_cpu) == len(host) + len(attn)  # host lanes' ops reach calibration, as CPU ops


@pytest.mark.parametrize("arch,offload", [("mixtral", "checkpoint"), ("mixtral", "store"),
                                          ("qwen2_moe", "store"), ("deepseek_v3", "checkpoint")])
def test_disk_tier_experts_computed_on_the_cpu_are_exact(checkpoints, tmp_path, arch, offload):
    """With 400 KiB of host memory the experts that are not GPU-resident live on disk (checkpoint tensors, or the
    packed store's records): each is read into host memory on the cpu_experts lane and computed there; none
    crosses to the device, and the tokens and logits are the resident engine's."""
    path, ref_toks, ref_logits = reference(checkpoints, arch)
    with LLM(path, device="cpu") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, "flexgen", "700KiB",
                                       "400KiB", str(tmp_path / "store") if offload == "store" else None,
                                       num_batches=2, batch_size=2, kv="cpu", host_compute=FORCED, hardware=FIXED)
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        logits = llm.logits(PROMPTS)
        ex = llm.executor
        tiers = {tier for tier, _ in ex.w.expert_home.values()}
        spans = list(ex.tracer.spans)
    assert tiers - {"gpu"} == {"disk" if offload == "checkpoint" else "store"}
    assert toks == ref_toks and rel(logits, ref_logits) < 1e-5
    reads = [s for s in spans if s[0] == "cpu_experts" and s[4].get("op") == "read"]
    assert reads and all(s[4]["read_bytes"] > 0 for s in reads)
    loads = [s[1] for s in spans if s[0] in ("prefetch", "expert_io")]  # "L3 e5", "L3 x4 experts", "L3 weights"
    assert not [name for name in loads if re.search(r" e\d+$| experts$", name)]  # no expert copied to the device


def test_decode_on_the_cpu_after_a_staged_prefill_and_the_rule(checkpoints):
    """Prefill attention on the device (KV staged from and back to host memory), decode on the CPU over the same
    host cache; cold experts by the rule on this machine's profile."""
    path, ref_toks, ref_logits = reference(checkpoints, "mixtral")
    toks, logits, spans, _, _ = run(path, "klotski", HostCompute(decode_attn="cpu", experts="auto"), hardware=None)
    assert toks == ref_toks and rel(logits, ref_logits) < 1e-5
    assert {"kv_load", "kv_store", "cpu_attn"} <= spans


def test_a_prefill_in_one_column_chunks_runs_the_prefill_placement(checkpoints, monkeypatch):
    """A prefill the executor runs one column at a time passes one column per forward, like a decode step; it is
    still the prefill and runs the prefill program: here attention on the CPU for the prefill, on the device
    for the decode step (without the phase from the executor every chunk ran the decode placement: no
    ``cpu_attn`` span at all)."""
    import klotski.runtime.executor as executor

    path, ref_toks, ref_logits = reference(checkpoints, "mixtral")
    monkeypatch.setattr(executor, "chunk_sizes", lambda S: [1])
    toks, logits, spans, _, _ = run(path, "klotski", HostCompute(prefill_attn="cpu"))
    assert toks == ref_toks and rel(logits, ref_logits) < 1e-5
    assert "cpu_attn" in spans and "kv_load" in spans  # prefill on the host cache, the decode step staged


def test_bad_host_compute_is_refused(checkpoints):
    path, _, _ = reference(checkpoints, "mixtral")
    with pytest.raises(ValueError, match="host_compute"):
        LLM(path, device="cpu", policy="klotski", host_compute="cpu")
    with pytest.raises(ValueError, match="decode_attn"):
        HostCompute(decode_attn="host")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["layerwise", "flexgen", "klotski"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_host_compute_is_exact_on_cuda(checkpoints, arch, policy):
    """On a GPU: Q/K/V and the hidden rows cross to the host, the CPU lanes compute, results come back."""
    path, _ = checkpoints.get(arch)
    with LLM(path, device="cuda", dtype="float32") as llm:
        ref_toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        ref_logits = llm.logits(PROMPTS)
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cuda"), torch.float32, policy, "8MiB", None, None,
                                       num_batches=2, batch_size=2, kv="cpu", host_compute=FORCED)
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        logits = llm.logits(PROMPTS)
        spans = {s[0] for s in llm.executor.tracer.spans}
    assert toks == ref_toks
    assert rel([t.cpu() for t in logits], [t.cpu() for t in ref_logits]) < 1e-5
    assert "cpu_attn" in spans and "kv_load" not in spans


def test_a_failing_host_lane_or_an_interrupt_leaves_a_reusable_llm(checkpoints, monkeypatch):
    """An error in a host lane's job (the CPU expert call) surfaces from generate(), and so does an interrupt of
    the main thread while a host lane works: either way the lanes are drained and idle, the host CPU
    is free, no thread is left behind, and the next generate() gives the resident engine's tokens."""
    import threading
    import time

    import klotski.runtime.compute as compute

    path, ref_toks, _ = reference(checkpoints, "mixtral")
    real_host = compute.fused_moe_torch
    with LLM(path, device="cpu") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, "flexgen", "700KiB", None,
                                       None, num_batches=2, batch_size=2, kv="cpu", host_compute=FORCED,
                                       hardware=FIXED)
        ex = llm.executor
        threads = threading.active_count()

        def fail_on(n, exc, real):
            calls = [0]

            def flaky(*a, **k):
                calls[0] += 1
                if calls[0] == n:
                    raise exc
                return real(*a, **k)
            return flaky, calls

        core = compute.ATTENTION_SPLIT["gqa"]
        host_jobs = [0]

        def counted_core(*a, **k):  # slow enough that the failing step still has CPU attention queued or running
            host_jobs[0] += 1
            time.sleep(0.03)
            return core[1](*a, **k)
        monkeypatch.setitem(compute.ATTENTION_SPLIT, "gqa", (core[0], counted_core, core[2]))

        def check_clean():
            assert ex.lanes.idle and ex.w.pool.slots.in_use == 0  # at once: the lanes were drained
            assert not ex.lanes.host_cpu._lock.locked()
            assert threading.active_count() == threads
            ran = host_jobs[0]
            time.sleep(0.2)
            assert host_jobs[0] == ran  # no job of the failed step runs later
            assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref_toks

        flaky, calls = fail_on(2, RuntimeError("host expert failed"), real_host)
        monkeypatch.setattr(compute, "fused_moe_torch", flaky)
        with pytest.raises(RuntimeError, match="host expert failed"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
        assert calls[0] == 2
        monkeypatch.setattr(compute, "fused_moe_torch", real_host)
        check_clean()

        real_submit = compute.Compute.attention_on_host
        calls = [0]

        def interrupted(*a, **k):  # Ctrl-C in the main thread just after a CPU attention job was handed over
            ticket = real_submit(*a, **k)
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt
            return ticket
        monkeypatch.setattr(compute.Compute, "attention_on_host", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
        monkeypatch.setattr(compute.Compute, "attention_on_host", real_submit)
        check_clean()
