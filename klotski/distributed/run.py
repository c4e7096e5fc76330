"""Per-rank generation and scoring for FSE-DP: each rank serves its own prompts, then drains."""
from __future__ import annotations

import torch

from klotski.distributed.model import DistributedModel
from klotski.generation import generate_batch, left_pad
from klotski.sampling import SamplingParams


def split_prompts(prompts: list, rank: int, world: int) -> list:
    """The prompts rank ``rank`` serves: every ``world``-th one, starting at ``rank`` (data parallel)."""
    return prompts[rank::world]


def gather_in_order(local: list, rank: int, world: int, group=None) -> list:
    """Inverse of :func:`split_prompts`: every rank's results, in the original prompt order (all ranks get it)."""
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, local, group=group)
    total = sum(len(p) for p in parts)
    return [parts[i % world][i // world] for i in range(total)]


def generate_on_rank(model: DistributedModel, prompts: list[list[int]], params: SamplingParams,
                     eos_token_ids: tuple[int, ...], seed: int = 0, max_num_seqs: int = 64) -> list[list[int]]:
    """This rank's prompts (possibly none) in batches of ``max_num_seqs``; then :meth:`~DistributedModel.drain`.
    Returns the generated token ids of each prompt."""
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for b in range(0, len(prompts), max_num_seqs):
        chunk = prompts[b : b + max_num_seqs]
        out += generate_batch(model, chunk, [params] * len(chunk), eos_token_ids, generator)
    model.drain()
    return out


def logits_on_rank(model: DistributedModel, prompts: list[list[int]], max_num_seqs: int = 64) -> list[torch.Tensor]:
    """fp32 logits [len, vocab] of every position of each of this rank's prompts (CPU); then drain."""
    out = []
    for b in range(0, len(prompts), max_num_seqs):
        chunk = prompts[b : b + max_num_seqs]
        batch, pad = left_pad(chunk)
        cache = model.new_cache(len(chunk), batch.shape[1], pad)
        logits = model.forward(batch, cache, all_logits=True).cpu()
        out += [logits[i, int(pad[i]) :] for i in range(len(chunk))]
    model.drain()
    return out
