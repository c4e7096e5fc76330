"""Chunked prefill: the rule that sizes it, shared by the runtime and the planner.

A group's prefill holds the activations of every sequence's new columns on the device at once (hidden states,
residuals, the FFN workspace, one batch's attention scores: ``ModelCosts.activation_bytes``). When they do not fit
what the device has left, the prompt's columns run in chunks over the same KV cache, every chunk a full pass
through the model: the same result, the weights streamed once per chunk. The runtime
(``OffloadedExecutor.forward``) takes the first chunk size of :func:`chunk_sizes` whose activations fit; the
planner prices a chunked prefill as :func:`num_chunks` steps of the :func:`prefill_shape` (so a group of
hundreds of sequences whose KV cache lives in host memory is not limited by its prefill activations).

Torch-free (the planner imports it).
"""
from __future__ import annotations

from klotski.schedule import StepShape


def chunk_sizes(prompt_len: int) -> list[int]:
    """The chunk sizes tried, largest first: the prompt length, then halved (rounded up) down to 1."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    out = [prompt_len]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def num_chunks(prompt_len: int, chunk: int) -> int:
    """Passes of a prefill of ``prompt_len`` columns in chunks of ``chunk``."""
    return -(-prompt_len // chunk)


def prefill_shape(batch_size: int, n: int, prompt_len: int, context_len: int, chunk: int | None = None) -> StepShape:
    """One prefill pass of ``chunk`` columns (None: the whole prompt) at the chunks' mean past length: over all
    passes the attention reads the same keys as one causal pass over the prompt, so ``num_chunks`` times this
    step is the chunked prefill."""
    chunk = prompt_len if chunk is None else chunk
    if not 1 <= chunk <= prompt_len:
        raise ValueError(f"prefill chunk must be in 1..{prompt_len}, got {chunk}")
    mean_past = (num_chunks(prompt_len, chunk) - 1) * chunk // 2
    return StepShape("prefill", batch_size, n, chunk, mean_past, context_len)
