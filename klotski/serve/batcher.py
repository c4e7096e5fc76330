"""Admission into batch groups, and the one engine worker thread that owns the ``LLM``.

Requests become :class:`Sequence` objects (one per prompt) and wait in the admission queue. The worker takes
the queue's oldest sequences together as the next batch group: as many as the engine's group size
(``LLM.max_num_seqs``: the plan's batch size x n offloaded), or fewer once the oldest has waited
``max_wait_s``; then it runs them through one ``LLM.generate`` call, so they share each weight load. Re-planning
is the engine's: ``generate`` re-plans only when the workload's shape moves to another class (the offloaded
session's ``REPLAN_FACTOR``). Sequences that arrive meanwhile wait for the next group.

The HTTP side never waits for the worker: :meth:`EngineWorker.submit` only appends to the queue (or refuses
at once: a full queue, a server that is stopping), and the worker hands tokens back through each sequence's
``emit`` callback (thread-safe; the app posts them onto its event loop). A cancelled sequence (its client went
away) leaves the queue at once, or stops generating at the next step and stops holding its group open.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from klotski.sampling import SamplingParams
from klotski.serve.decoding import SequenceText
from klotski.serve.metrics import ServerMetrics

log = logging.getLogger("klotski.serve")


class Rejected(Exception):
    """A request the server refuses before admission: ``status`` (HTTP) and a message naming the reason."""

    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


@dataclass(eq=False)
class Sequence:
    """One prompt of one request. ``emit(event)`` receives, on the worker thread, dicts with ``type``:
    ``"delta"`` (``text``, ``token_ids``; only when ``stream``), ``"done"`` (``text``, ``token_ids``,
    ``finish_reason``: "stop" | "length", ``prompt_tokens``) or ``"error"`` (``status``, ``message``)."""

    prompt_token_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict], None]
    stop: tuple[str, ...] = ()
    stream: bool = False
    arrival: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    text: SequenceText | None = None


class EngineWorker:
    """Owns ``llm`` (a :class:`klotski.engine.LLM`) on one thread. ``max_wait_s``: how long the oldest queued
    sequence waits for its group to fill; ``max_queue``: sequences that may wait (more are refused, 429)."""

    def __init__(self, llm, max_wait_s: float = 0.02, max_queue: int = 256, metrics: ServerMetrics | None = None):
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.llm = llm
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._queue: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Sequence] = []
        self._capacity = llm.max_num_seqs
        self._thread = threading.Thread(target=self._run, name="klotski-engine", daemon=True)

    # ---- HTTP side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def group_capacity(self) -> int:
        """Sequences the next batch group takes, as the worker last read it from the engine (a re-plan may
        change it; the HTTP side never touches the engine's session)."""
        return self._capacity

    @property
    def alive(self) -> bool:
        """Serving: started, not stopping."""
        return self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A batch group is in the engine (until its ``generate`` call has returned and been recorded)."""
        return bool(self._running)

    @property
    def running(self) -> int:
        return sum(1 for s in self._running if not (s.finished or s.cancelled))

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (one request's prompts, admitted all or none); raises :class:`Rejected`."""
        with self._cond:
            if self._stopping or (self._thread.ident is not None and not self._thread.is_alive()):
                raise Rejected(503, "the server is shutting down", "shutting_down")
            if len(self._queue) + len(seqs) > self.max_queue:
                raise Rejected(429, f"the admission queue is full ({len(self._queue)} of --max-queue "
                                    f"{self.max_queue} sequences waiting); retry later", "queue_full")
            for s in seqs:
                s.arrival = time.monotonic()
                if s.stream or s.stop:
                    s.text = SequenceText(self.llm.tokenizer, s.stop)
            self._queue.extend(seqs)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: drop ``seq`` from the queue, or stop it at the engine's next step."""
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        with self._cond:
            try:
                self._queue.remove(seq)
            except ValueError:
                pass  # admitted already: the worker stops it at its next step
        self.metrics.count_cancelled()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new sequences, cancel the queued ones, let the running group end, join the worker thread."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for s in waiting:
            s.cancelled = True
            s.emit({"type": "error", "status": 503, "message": "the server shut down before this request ran"})
        for s in list(self._running):  # whatever still runs has lost its client (uvicorn has drained)
            self.cancel(s)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the engine worker did not stop within %.0f s", timeout_s)

    # ---- worker thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._serve(group)
            except BaseException as e:  # noqa: BLE001 - never leave a client waiting on a dead worker
                log.exception("batch group failed")
                self._fail(group, 500, f"internal error: {type(e).__name__}: {e}")
            finally:
                self._running = []

    def _next_group(self) -> list[Sequence] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            size = self._capacity = self.llm.max_num_seqs
            deadline = self._queue[0].arrival + self.max_wait_s
            while self._queue and len(self._queue) < size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            group = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            self._running = group
            return group

    def _serve(self, group: list[Sequence]) -> None:
        if not group:
            return
        t0 = time.perf_counter()
        try:
            self.llm.generate(prompt_token_ids=[s.prompt_token_ids for s in group],
                              sampling_params=[s.params for s in group],
                              on_tokens=lambda tokens, finished: self._step(group, tokens, finished))
        except ValueError as e:  # refused before generating: a budget the group exceeds (BudgetError), ...
            if len(group) > 1 and not any(s.token_ids for s in group):
                # ... so serve it in two halves (recursively: a request no group can serve fails alone)
                log.warning("a batch group of %d sequences was refused (%s): serving it in halves", len(group), e)
                half = (len(group) + 1) // 2
                for part in (group[:half], group[half:]):
                    self._running = part
                    self._serve(part)
                return
            self._fail(group, 400, str(e))
            return
        seconds = time.perf_counter() - t0
        for s in group:  # every sequence finishes in _step; this only guards a missed one
            if not (s.finished or s.cancelled):
                self._finish(s, "length" if len(s.token_ids) >= s.params.max_tokens else "stop")
        m = self.llm.metrics
        self.metrics.record_group(len(group), m.prompt_tokens, m.generated_tokens, seconds, m.extra)

    def _step(self, group: list[Sequence], tokens: dict[int, int], finished: dict[int, str]) -> list[int]:
        """The engine's per-step hook: hand out tokens, finish sequences, return the rows to stop."""
        self.metrics.count_tokens(len(tokens))
        stop = []
        for i, token in tokens.items():
            s = group[i]
            if s.cancelled:
                continue
            s.token_ids.append(token)
            reason = finished.get(i)
            if s.text is not None and s.text.update(s.token_ids):
                reason = "stop"  # a stop string
                stop.append(i)
            if reason is not None:
                self._finish(s, reason)
            elif s.stream:
                s.emit({"type": "delta", "text": s.text.delta(), "token_ids": [token]})
        stop += [i for i, s in enumerate(group) if s.cancelled]
        return stop

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finished = True
        if s.text is None:
            text = self.llm.tokenizer.decode(s.token_ids)
        else:
            text = s.text.text
        event = {"type": "done", "text": text, "token_ids": list(s.token_ids), "finish_reason": reason,
                 "prompt_tokens": len(s.prompt_token_ids)}
        if s.stream:
            event["delta"] = s.text.delta(final=True)
            event["delta_token_ids"] = s.token_ids[-1:] if s.token_ids else []
        self.metrics.count_finished(reason)
        s.emit(event)

    def _fail(self, group: list[Sequence], status: int, message: str) -> None:
        for s in group:
            if not (s.finished or s.cancelled):
                s.finished = True
                s.emit({"type": "error", "status": status, "message": message})
