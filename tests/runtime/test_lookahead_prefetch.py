"""Gate-lookahead prefetch in the runtime: it changes what loads early, never the tokens."""
import pytest

from klotski import LLM, SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch,budget", [("mixtral", ("700KiB", "200KiB")), ("qwen2_moe", ("1200KiB", "300KiB")),
                                         ("olmoe", ("900KiB", "250KiB")), ("deepseek_v3", ("2MiB", "600KiB"))])
def test_lookahead_keeps_the_tokens_and_predicts(checkpoints, tmp_path, arch, budget):
    path, _ = checkpoints.get(arch)
    with LLM(path, device="cpu") as ref_llm:
        ref = [o.token_ids for o in ref_llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    for policy in ("klotski", "flexgen", "layerwise"):
        with LLM(path, device="cpu", policy=policy, gpu_memory=budget[0], cpu_memory=budget[1], num_batches=2,
                 batch_size=2, offload_dir=str(tmp_path / f"off-{policy}"), prefetch="lookahead") as llm:
            out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            m = llm.metrics.extra
            uses = llm.executor.predictor is not None
        assert out == ref, (arch, policy)
        assert uses == (policy == "klotski" and llm.session.plan.num_hot is not None)
        if arch == "mixtral" and policy == "klotski":
            assert uses  # these budgets plan the klotski order: the lookahead really ran
        if uses:
            assert m["prefetch_predictions"] > 0 and set(m["prefetch_sources"].values()) <= {"table", "lookahead"}
            assert 0.0 <= m["prefetch_lookahead_recall"] <= 1.0


def test_prefetch_option_is_checked(checkpoints):
    path, _ = checkpoints.get("mixtral")
    with pytest.raises(ValueError, match="prefetch must be one of"):
        LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB", prefetch="oracle")
