"""Sampling parameters (vLLM's offline meanings) and the sampler that applies them to a batch of logits."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` -1 and ``top_p`` 1 disable those filters; ``seed`` makes one
    request's samples reproducible independent of its batch mates."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        self.max_tokens = _int("max_tokens", self.max_tokens)
        self.temperature = _real("temperature", self.temperature)
        self.top_p = _real("top_p", self.top_p)
        self.top_k = _int("top_k", self.top_k)
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
            self.stop_token_ids = [_int("stop_token_ids entry", t) for t in self.stop_token_ids]
            if any(t < 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Per-request generators: a seeded request gets its own; the rest share the engine's."""

    def __init__(self, params: list[SamplingParams], engine_generator: torch.Generator):
        self.params = params
        self.generators = [
            torch.Generator().manual_seed(p.seed) if p.seed is not None else engine_generator for p in params
        ]

    def sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """logits [len(rows), V] fp32 for requests ``rows`` -> one token id each."""
        out = []
        logits = logits.float().cpu()
        for j, r in enumerate(rows):
            p = self.params[r]
            row = logits[j]
            if p.greedy:
                out.append(int(torch.argmax(row)))
                continue
            row = row / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # smallest prefix reaching top_p
                keep[0] = True
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask[order[keep]] = True
                probs = torch.where(mask, probs, torch.zeros_like(probs))
                probs = probs / probs.sum()
            out.append(int(torch.multinomial(probs, 1, generator=self.generators[r])))
        return out
