"""The server's counters and their Prometheus text exposition (``GET /metrics``).

Counters are written by the engine worker and the HTTP handlers and read by ``/metrics``; each update is one
short critical section under the object's lock.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MOVED_KINDS = ("bytes_disk_read", "bytes_h2d", "bytes_kv_h2d", "bytes_kv_d2h")  # keys of LLM.metrics.extra


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.http = Counter()  # (endpoint, status code) -> responses
        self.rejected = Counter()  # reason -> sequences refused before admission
        self.finished = Counter()  # finish reason -> sequences
        self.cancelled = 0  # sequences whose client went away (queued or running)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.groups = 0
        self.group_sizes = Counter()  # sequences admitted together -> number of groups
        self.moved = Counter()  # bytes moved by the offloaded runtime, per kind (MOVED_KINDS)
        self.weights_per_tier: dict[str, int] = {}
        self.last_group_tokens_per_s = 0.0
        self.engine_seconds = 0.0  # time the worker spent inside LLM.generate

    def count_http(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, status)] += 1

    def count_rejected(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.rejected[reason] += n

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def count_tokens(self, n: int) -> None:
        with self._lock:
            self.generation_tokens += n

    def record_group(self, size: int, prompt_tokens: int, tokens: int, seconds: float, extra: dict) -> None:
        """One batch group served: its size, its tokens and seconds, and the engine's run metrics."""
        with self._lock:
            self.groups += 1
            self.group_sizes[size] += 1
            self.prompt_tokens += prompt_tokens
            self.engine_seconds += seconds
            self.last_group_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
            for kind in MOVED_KINDS:
                self.moved[kind] += int(extra.get(kind) or 0)
            if isinstance(extra.get("weights_per_tier"), dict):
                self.weights_per_tier = {k: int(v) for k, v in extra["weights_per_tier"].items()}

    def render(self, queued: int, running: int, group_capacity: int, busy: bool = False) -> str:
        """The Prometheus text format (version 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP klotski_{name} {help_}")
            out.append(f"# TYPE klotski_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append(f"klotski_{name}{{{lab}}} {value}" if lab else f"klotski_{name} {value}")

        with self._lock:
            metric("http_requests_total", "counter", "HTTP responses by endpoint and status code",
                   [({"endpoint": e, "code": c}, n) for (e, c), n in sorted(self.http.items())])
            metric("requests_rejected_total", "counter", "sequences refused before admission, by reason",
                   [({"reason": r}, n) for r, n in sorted(self.rejected.items())])
            metric("requests_finished_total", "counter", "sequences finished, by finish reason",
                   [({"reason": r}, n) for r, n in sorted(self.finished.items())])
            metric("requests_cancelled_total", "counter", "sequences cancelled by a client that went away",
                   [({}, self.cancelled)])
            metric("requests_queued", "gauge", "sequences waiting for a batch group", [({}, queued)])
            metric("requests_running", "gauge", "sequences generating in the current batch group",
                   [({}, running)])
            metric("engine_busy", "gauge", "1 while a batch group is in the engine (recorded when it leaves)",
                   [({}, int(busy))])
            metric("batch_group_capacity", "gauge", "sequences one batch group takes (the plan's batch x n)",
                   [({}, group_capacity)])
            metric("prompt_tokens_total", "counter", "prompt tokens admitted", [({}, self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "tokens generated", [({}, self.generation_tokens)])
            metric("generation_tokens_per_second", "gauge", "tokens/s of the last batch group",
                   [({}, round(self.last_group_tokens_per_s, 3))])
            metric("engine_busy_seconds_total", "counter", "seconds the engine spent generating",
                   [({}, round(self.engine_seconds, 6))])
            metric("bytes_moved_total", "counter", "bytes moved between tiers by the offloaded runtime",
                   [({"kind": k.removeprefix("bytes_")}, self.moved[k]) for k in MOVED_KINDS])
            metric("weight_bytes", "gauge", "weight bytes placed per tier",
                   [({"tier": t}, n) for t, n in sorted(self.weights_per_tier.items())])
            out.append("# HELP klotski_batch_group_size sequences admitted together into one batch group")
            out.append("# TYPE klotski_batch_group_size histogram")
            total = 0
            for le in GROUP_SIZE_BUCKETS:
                total = sum(n for s, n in self.group_sizes.items() if s <= le)
                out.append(f'klotski_batch_group_size_bucket{{le="{le}"}} {total}')
            out.append(f'klotski_batch_group_size_bucket{{le="+Inf"}} {self.groups}')
            out.append(f"klotski_batch_group_size_sum {sum(s * n for s, n in self.group_sizes.items())}")
            out.append(f"klotski_batch_group_size_count {self.groups}")
        return "\n".join(out) + "\n"

    def snapshot(self) -> dict:
        """Plain numbers for benchmarks and tests."""
        with self._lock:
            return {"groups": self.groups, "group_sizes": dict(self.group_sizes), "cancelled": self.cancelled,
                    "finished": dict(self.finished), "generation_tokens": self.generation_tokens}
