"""Run one model under several policies with the same requests; a metrics row per policy.

Shared by ``klotski demo`` and ``klotski bench``: greedy decoding, so every policy must produce the same tokens;
on a profile no run has calibrated yet, one run calibrates it first (:func:`calibrate_first`).
"""
from __future__ import annotations

from klotski.cli.metrics_table import metrics_row
from klotski.cli.options import build_llm, write_traces


def compare_policies(args, model_dir: str, policies, prompts=None, prompt_token_ids=None, max_tokens: int = 16,
                     on_first=None, after_run=None) -> tuple[list[dict], dict, bool]:
    """-> (table rows, raw metrics per policy, whether every policy produced the same tokens).
    ``after_run(llm, policy)`` runs after each policy's generate, before the LLM is closed."""
    from klotski.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows, raw, tokens = [], {}, {}
    for policy in policies:
        llm = build_llm(args, model_dir, policy)
        try:
            outputs = llm.generate(prompts, params, prompt_token_ids=prompt_token_ids)
            tokens[policy] = [o.token_ids for o in outputs]
            if on_first is not None and policy == policies[0]:
                on_first(outputs)
            m = llm.metrics
            rows.append(metrics_row(policy, m))
            raw[policy] = {"tokens_per_s": m.tokens_per_s, "generated_tokens": m.generated_tokens,
                           "total_s": m.total_s, "device": str(llm.device), "dtype": str(llm.dtype),
                           **{k: v for k, v in m.extra.items() if isinstance(v, (int, float, str, type(None)))}}
            print(f"policy {policy}: {m.tokens_per_s:.1f} tokens/s ({llm.device}, {llm.dtype})", flush=True)
            write_traces(llm, args, suffix=policy if len(policies) > 1 else "")
            if after_run is not None:
                after_run(llm, policy)
        finally:
            llm.close()
    return rows, raw, len({str(t) for t in tokens.values()}) <= 1


def calibrate_first(args, model_dir: str, policies, prompts=None, prompt_token_ids=None,
                    max_tokens: int = 16) -> None:
    """Before comparing several policies on a profile no run has calibrated yet (a fresh cache: rates measured
    seconds earlier): one run of the first offloaded policy on the comparison's requests, whose per-op timings
    the session feeds back into the cached profile, so that every policy of the comparison plans on the same,
    corrected rates (otherwise the first plans on the raw measurement and the later ones on what its run taught
    the cache). The run generates as many tokens as the comparison: on the costs a prefill-heavy one (4 tokens)
    fitted, the planner chose a plan of many small micro-batches that then ran at a quarter of its predicted rate.
    Not under the Triton interpreter, whose profile is never fed back."""
    from klotski.cli import options  # looked up at call time (tests stand in for build_llm)
    from klotski.profile_cache import interpreter_on
    from klotski.sampling import SamplingParams

    offloaded = [p for p in policies if p != "resident"]
    if len(policies) < 2 or not offloaded or interpreter_on():
        return
    llm = options.build_llm(args, model_dir, offloaded[0])
    try:
        if llm.session.hardware.calibrated:
            return
        print("first run on this machine: a run calibrates its hardware profile first, so that every policy "
              "plans on the same rates", flush=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                     prompt_token_ids=prompt_token_ids)
    finally:
        llm.close()
