"""Run one model under several policies with the same requests; a metrics row per policy.

Shared by ``klotski demo`` and ``klotski bench``: greedy decoding, so every policy must produce the same tokens.
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
