"""A group whose prefill activations do not fit the device budget runs its prompt in chunks over the same KV
cache (CPU mode): the resident engine's greedy tokens, and the plan was made for a chunked prefill too."""
from klotski import LLM, SamplingParams
from klotski.hardware import preset

PROMPTS = [[(i * 7 + j) % 90 + 3 for j in range(64)] for i in range(8)]
SP = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def test_prefill_in_chunks_gives_the_resident_tokens(checkpoints):
    path, _ = checkpoints.get("mixtral")
    with LLM(path, device="cpu") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    with LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="64MiB",
             hardware=preset("rtx3090")) as llm:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        chunks = llm.metrics.extra["prefill_chunks"]
        planned = llm.session.run_plan.plan.placement.prefill_chunk
    assert out == ref
    assert chunks > 1  # the executor ran the 64 columns in passes
    assert planned is not None and planned < 64  # and the plan priced a chunked prefill
