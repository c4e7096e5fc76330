"""Batched autoregressive generation over any executor with ``new_cache`` and ``forward``.

Prompts of different lengths are left-padded into one batch; each step samples one token per unfinished
request; a request stops at EOS (unless ``ignore_eos``), at one of its ``stop_token_ids``, at
``max_tokens``, or when the caller's ``on_tokens`` hook stops it (a cancelled request, a stop string). The stop
token is kept in ``token_ids`` (as vLLM does).
"""
from __future__ import annotations

from typing import Protocol

import torch

from klotski.model.kv_cache import KVCache
from klotski.sampling import Sampler, SamplingParams


class Executor(Protocol):
    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor) -> KVCache: ...

    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor: ...


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids [B, S_max], pad [B]) with each prompt right-aligned."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
    return ids, pad


def generate_batch(
    executor: Executor,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_token_ids: tuple[int, ...],
    engine_generator: torch.Generator,
    on_step=None,
    on_tokens=None,
) -> list[list[int]]:
    """Generate for one batch; returns the new token ids of each prompt.

    ``on_step(n)``: after each step, the number of tokens it sampled. ``on_tokens(tokens, finished)``: after
    each step, ``tokens`` = {row: token} for every row (index into ``prompts``) that sampled one, ``finished`` =
    {row: "stop" (EOS or a stop token) | "length" (max_tokens)} for the rows that finished with it; it returns
    the rows to stop now (an iterable, or None): they sample no further token. A stopped row still rides in
    the batch's forwards until the batch ends (its KV rows are part of the batch), and the batch ends as soon
    as every row is finished or stopped.
    """
    ids, pad = left_pad(prompts)
    steps = max(p.max_tokens for p in params)
    cache = executor.new_cache(len(prompts), ids.shape[1] + steps, pad)
    sampler = Sampler(params, engine_generator)
    outputs: list[list[int]] = [[] for _ in prompts]
    stops = [set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids)) for p in params]
    done = [False] * len(prompts)
    logits = executor.forward(ids, cache)
    for _ in range(steps):
        rows = [i for i in range(len(prompts)) if not done[i]]
        tokens = sampler.sample(logits[rows], rows)
        finished = {}
        for r, t in zip(rows, tokens):
            outputs[r].append(t)
            if t in stops[r] or len(outputs[r]) >= params[r].max_tokens:
                done[r] = True
                finished[r] = "stop" if t in stops[r] else "length"
        if on_step is not None:
            on_step(len(rows))
        if on_tokens is not None:
            for r in on_tokens(dict(zip(rows, tokens)), finished) or ():
                done[r] = True
        if all(done):
            break
        nxt = torch.tensor([o[-1] for o in outputs], dtype=torch.long)[:, None]
        logits = executor.forward(nxt, cache)
    return outputs
