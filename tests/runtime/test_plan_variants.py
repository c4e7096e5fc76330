"""Every plan variant the planner can emit runs as planned: flexgen with and without overlap, klotski with
FlexGen's order (num_hot=None), klotski after the gates (top_k hot, or the narrower widths searched under
expert selection: one, none) and wide-early (all experts hot, issued with the next layer's weights). Each forces the planner to one variant, runs, and checks the issue order the
runtime used against the variant's, and the greedy tokens against the resident engine."""
import pytest

from klotski import LLM, SamplingParams
from klotski.planner import Planner
from klotski.runtime.compute import Compute
from klotski.runtime.executor import OffloadedExecutor
from klotski.runtime.loads import WeightLoads

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    path, _ = checkpoints.get("mixtral")
    with LLM(path, device="cpu") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def traced_run(path, policy, variant, monkeypatch, tmp_path):
    """Run with the planner restricted to ``variant`` = (num_hot, overlap); -> (tokens, plan, order, steps)
    where each step is the list of issue / compute events of one forward, in order."""
    log: list[tuple] = []
    monkeypatch.setattr(Planner, "variants", lambda self, p: [variant])

    def wrap(cls, name, event):
        real = getattr(cls, name)

        def f(self, *a, **k):
            log.append(event(*a, **k))
            return real(self, *a, **k)

        monkeypatch.setattr(cls, name, f)

    wrap(OffloadedExecutor, "_forward", lambda *a, **k: ("step",))
    wrap(WeightLoads, "dense", lambda layer, lane="prefetch", op_ids=(): ("dense", layer))
    wrap(WeightLoads, "expert", lambda layer, e, lane, op_ids=(): ("expert", layer, lane))
    wrap(WeightLoads, "experts", lambda layer, experts, lane, op_ids=(): ("experts", layer))
    wrap(Compute, "attention", lambda st, w, layer, k, kv: ("attn", layer))
    wrap(Compute, "gate", lambda w, h, layer, k, **kw: ("gate", layer))
    with LLM(path, device="cpu", policy=policy, gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2,
             batch_size=2, offload_dir=str(tmp_path / "off")) as llm:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        plan, runner = llm.session.plan, llm.executor.runner.policy  # the op order the interpreter runs
    monkeypatch.undo()
    steps, cur = [], None
    for ev in log:
        if ev == ("step",):
            cur = []
            steps.append(cur)
        elif cur is not None:
            cur.append(ev)
    return out, plan, runner, steps


def first(step, pred) -> int:
    return next(i for i, ev in enumerate(step) if pred(ev))


def last(step, pred) -> int:
    return max(i for i, ev in enumerate(step) if pred(ev))


@pytest.mark.parametrize("policy,variant", [("flexgen", (None, True)), ("flexgen", (None, False)),
                                            ("klotski", (None, True)), ("klotski", (None, False))],
                         ids=["flexgen-overlap", "flexgen-no-overlap", "klotski-flexgen-order-overlap",
                              "klotski-flexgen-order-no-overlap"])
def test_flexgen_order_variants(mixtral, tmp_path, monkeypatch, policy, variant):
    path, ref = mixtral
    out, plan, runner, steps = traced_run(path, policy, variant, monkeypatch, tmp_path)
    assert out == ref
    assert (plan.num_hot, plan.overlap) == variant and runner == "flexgen"
    for step in steps:
        nxt = first(step, lambda ev: ev[0] in ("dense", "experts") and ev[1] == 1)  # layer 1's first load
        if plan.overlap:  # layer 1 loads while layer 0 computes
            assert nxt < first(step, lambda ev: ev == ("attn", 0)), step
        else:  # layer 1 loads once layer 0's last batch has gone through its gate
            assert nxt > last(step, lambda ev: ev == ("gate", 0)), step


@pytest.mark.parametrize("variant", ["after-gates", "wide-early", "one-hot", "no-hot"])
def test_klotski_prefetch_variants(mixtral, tmp_path, monkeypatch, variant):
    path, ref = mixtral
    E, K = 4, 2  # the tiny mixtral: 4 experts, top-2
    num_hot, overlap = {"after-gates": (K, False), "wide-early": (E, True), "one-hot": (1, False),
                        "no-hot": (0, False)}[variant]  # the last two: widths searched under expert selection
    out, plan, runner, steps = traced_run(path, "klotski", (num_hot, overlap), monkeypatch, tmp_path)
    assert out == ref
    assert (plan.num_hot, plan.overlap) == (num_hot, overlap) and runner == "klotski"
    hot_issued = 0
    for step in steps:
        hot = [i for i, ev in enumerate(step) if ev == ("expert", 1, "prefetch")]
        assert len(hot) <= num_hot, step
        hot_issued += len(hot)
        if not hot:
            continue
        if overlap:  # with layer 1's weights, before layer 0 computes
            assert hot[0] < first(step, lambda ev: ev == ("attn", 0)), step
        else:  # predicted from layer 0's routing: after its gates
            assert hot[0] > last(step, lambda ev: ev == ("gate", 0)), step
    if num_hot == 0:  # every expert of layer 1 loads after its gate, on the expert_io lane
        assert hot_issued == 0 and any(ev == ("expert", 1, "expert_io") for step in steps for ev in step)
    else:
        assert hot_issued > 0, "no hot expert was prefetched for layer 1: the variant was not exercised"
