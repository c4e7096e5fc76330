"""The runtime executes the ops the policy's builder emits, and nothing else: for every policy and every plan
variant the planner can emit, each lane's executed op order equals the builder's ops for the routing that
occurred (rebuilt offline from the recorded routing answers), every op ran exactly once, and the greedy tokens
equal the resident engine's."""
from functools import partialmethod

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.planner import Planner
from klotski.program import Builder, ReplayView, step_ops
from klotski.runtime import OffloadedSession
from klotski.runtime.interpreter import StepInterpreter

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
E, K = 4, 2  # the tiny mixtral: 4 experts, top-2

VARIANTS = {  # id -> (policy, (num_hot, overlap), expected op order)
    "layerwise": ("layerwise", (None, False), "layerwise"),
    "flexgen-overlap": ("flexgen", (None, True), "flexgen"),
    "flexgen-no-overlap": ("flexgen", (None, False), "flexgen"),
    "klotski-flexgen-order": ("klotski", (None, True), "flexgen"),
    "klotski-after-gates": ("klotski", (K, False), "klotski"),
    "klotski-wide-early": ("klotski", (E, True), "klotski"),
}


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    path, _ = checkpoints.get("mixtral")
    with LLM(path, device="cpu") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def key(op):
    return (op.kind, op.stream, op.layer, op.batch, op.expert, op.experts, op.deps)


def recorded_run(path, policy, variant, monkeypatch, tmp_path, **kw):
    monkeypatch.setattr(Planner, "variants", lambda self, p: [variant])
    monkeypatch.setattr(StepInterpreter, "__init__", partialmethod(StepInterpreter.__init__, record=True))
    with LLM(path, device="cpu", policy=policy, num_batches=2, batch_size=2, offload_dir=str(tmp_path / "off"),
             **kw) as llm:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        runner, plan = llm.executor.runner, llm.session.plan
    monkeypatch.undo()
    return out, runner, plan


def check_steps(runner):
    assert runner.steps, "no step was recorded"
    for step in runner.steps:
        # the builder, fed the routing the run produced, emits the ops the run was built from
        replay = Builder(step["context"])
        ops = list(step_ops(runner.policy, replay, ReplayView(step["routing"])))
        assert [key(o) for o in ops] == [key(o) for o in step["ops"]]
        # every op but a release ran once, on the lane of its stream, in the builder's order per lane
        executed: dict[str, list[int]] = {}
        for lane, op_id in step["lanes"]:
            executed.setdefault(lane, []).append(op_id)
        expected: dict[str, list[int]] = {}
        for op in ops:
            if op.kind != "release":
                expected.setdefault(op.stream, []).append(op.id)
        assert executed == expected
        # a gate's routing reaches the ops after it: every expert load after a gate is for an expert it chose
        for op in ops:
            if op.kind in ("read", "h2d") and op.stream == "expert_io":
                chosen = {e for q, sel in step["routing"].items() if q[:2] == ("selected", op.layer) for e in sel}
                assert op.expert in chosen


@pytest.mark.parametrize("vid", list(VARIANTS))
def test_runtime_runs_the_builders_ops(mixtral, tmp_path, monkeypatch, vid):
    path, ref = mixtral
    policy, variant, order = VARIANTS[vid]
    out, runner, plan = recorded_run(path, policy, variant, monkeypatch, tmp_path, gpu_memory="700KiB",
                                     cpu_memory="200KiB")
    assert out == ref
    assert (plan.num_hot, plan.overlap) == variant and runner.policy == order
    check_steps(runner)
    kinds = {op.kind for step in runner.steps for op in step["ops"]}
    assert {"read", "h2d", "attn", "gate", "shared", "lm_head", "release"} <= kinds  # disk tier exercised


@pytest.mark.parametrize("policy,n,buffers", [("flexgen", 2, 2), ("klotski", 2, 2), ("flexgen", 4, 2),
                                              ("klotski", 4, 4)])
def test_kv_in_host_memory_runs_the_builders_ops(mixtral, tmp_path, monkeypatch, policy, n, buffers):
    """A KV cache in host memory adds KV loads / stores on their own lanes, in the builder's order, with the
    staging buffers the op order assumes (klotski: one per micro-batch, the next layer's loads issued once a
    layer's gates have run)."""
    path, ref = mixtral
    monkeypatch.setattr(StepInterpreter, "__init__", partialmethod(StepInterpreter.__init__, record=True))
    with LLM(path, device="cpu") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, policy, "700KiB", "400KiB",
                                       str(tmp_path / "off"), num_batches=n, batch_size=len(PROMPTS) // n, kv="cpu")
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        runner = llm.executor.runner
        assert llm.executor.kv.pool.capacity == buffers
    assert out == ref
    check_steps(runner)
    assert all(step["context"].kv_buffers == buffers for step in runner.steps)
    lanes = {lane for step in runner.steps for lane, _ in step["lanes"]}
    assert {"kv_load", "kv_store"} <= lanes
