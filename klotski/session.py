"""The session protocol the engine drives, and the session of the resident policy.

A session owns one model's execution between ``LLM`` calls; the engine (:class:`klotski.engine.LLM`) knows
only this protocol, never a policy:

* ``executor``: ``new_cache(batch_size, capacity, pad)`` / ``forward(input_ids, cache, all_logits)``
  (:class:`klotski.generation.Executor`);
* ``group_size``: the most sequences one ``forward`` batch takes;
* ``prepare(prompt_token_ids, max_tokens)`` before a ``generate`` call (re-plan, warm up), ``reset_metrics()``,
  ``finish()`` after it (save side files), ``metrics`` (a dict for ``LLM.metrics.extra``);
* ``can_trace`` / ``write_trace(path)`` / ``write_timeline(path)``; ``close()`` (idempotent).

:func:`open_session` picks the session class for a policy: :class:`ResidentSession` for "resident", the
offloaded runtime's :class:`~klotski.runtime.session.OffloadedSession` otherwise.
"""
from __future__ import annotations

from typing import Protocol

import torch

from klotski.model.resident import ResidentModel

POLICIES = ("resident", "layerwise", "flexgen", "klotski")


class Session(Protocol):
    executor: object
    can_trace: bool

    @property
    def group_size(self) -> int: ...

    def prepare(self, prompt_token_ids: list[list[int]], max_tokens: list[int]) -> None: ...

    def reset_metrics(self) -> None: ...

    def finish(self) -> object: ...

    @property
    def metrics(self) -> dict: ...

    def write_trace(self, path: str) -> None: ...

    def write_timeline(self, path: str) -> None: ...

    def close(self) -> None: ...


class ResidentSession:
    """Every weight on ``device`` (:class:`~klotski.model.resident.ResidentModel`); ``max_num_seqs`` per batch."""

    can_trace = False

    def __init__(self, weights, device: torch.device, dtype: torch.dtype, max_num_seqs: int = 64,
                 expert_selection=None):
        self.executor: ResidentModel | None = ResidentModel(weights, device, dtype, expert_selection=expert_selection)
        self._group = max_num_seqs

    @property
    def group_size(self) -> int:
        return self._group

    def prepare(self, prompt_token_ids, max_tokens) -> None:
        if self.executor is None:
            raise RuntimeError("this resident session is closed")

    def reset_metrics(self) -> None:
        if self.executor is not None:
            self.executor.selection_stats.reset()

    def finish(self) -> None:
        return None

    @property
    def metrics(self) -> dict:
        """Expert selection's counters when it is on (:class:`~klotski.model.expert_selection.SelectionStats`)."""
        ex = self.executor
        if ex is None or not ex.selection.measured:
            return {}
        return ex.selection_stats.as_dict(ex.selection)

    def write_trace(self, path: str) -> None:
        raise RuntimeError("the resident policy runs no streams: there is no trace to write")

    write_timeline = write_trace

    def close(self) -> None:
        self.executor = None


def open_session(policy: str, weights, device: torch.device, dtype: torch.dtype, max_num_seqs: int = 64,
                 expert_selection=None, **offload) -> Session:
    """The session for ``policy``; ``offload``: :class:`~klotski.runtime.session.OffloadedSession`'s options
    (budgets, ``offload_dir``, group shape), ignored by the resident policy. ``expert_selection``: decode-step
    expert selection under every policy (:mod:`klotski.model.expert_selection`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}")
    if policy == "resident":
        return ResidentSession(weights, device, dtype, max_num_seqs, expert_selection=expert_selection)
    from klotski.runtime.session import OffloadedSession

    return OffloadedSession(weights, device, dtype, policy, expert_selection=expert_selection, **offload)
