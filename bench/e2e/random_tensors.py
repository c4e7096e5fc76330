"""Random tensors for bench/e2e/make_checkpoint.py, drawn in order and reproducibly: every tensor has its own
generator seeded from (seed, name), so its values do not depend on the shard size, the order or the number of
threads (cuda and cpu draw different numbers). A tensor description needs ``name``, ``shape``, ``dtype``,
``nbytes``, ``mean`` and ``std`` (``make_checkpoint.TensorSpec``).
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from make_checkpoint import TensorSpec

CHUNK_ELEMENTS = 1 << 23  # cpu: elements drawn per generator (one thread each)


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


class Sampler:
    """Draws tensors in order on ``device``, yielding each on the cpu, contiguous, in its dtype.

    cuda: one generator per tensor. cpu: each tensor is cut along its flattened elements into chunks of
    CHUNK_ELEMENTS, each with its own generator; the chunks of the next tensors are drawn by a thread pool
    while earlier ones are handed out (at most ``ahead_bytes`` of tensors in flight, or one tensor), so
    small tensors (one chunk each) use every core too."""

    def __init__(self, device: torch.device, seed: int, threads: int | None = None, ahead_bytes: int = 1 << 29):
        self.device, self.seed, self.ahead_bytes = device, seed, ahead_bytes
        self.threads = threads or torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.threads) if device.type == "cpu" else None

    def _draw_cuda(self, t: TensorSpec) -> torch.Tensor:
        n = t.nbytes // t.dtype.itemsize
        g = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, t.name))
        x = torch.randn(n, generator=g, device=self.device, dtype=torch.float32).mul_(t.std).add_(t.mean)
        return x.to(t.dtype).cpu().view(t.shape)

    def _submit_cpu(self, t: TensorSpec):
        base, n = tensor_seed(self.seed, t.name), t.nbytes // t.dtype.itemsize
        out = torch.empty(n, dtype=t.dtype)

        def fill(i: int) -> None:
            lo, hi = i * CHUNK_ELEMENTS, min(n, (i + 1) * CHUNK_ELEMENTS)
            g = torch.Generator().manual_seed(base + i)
            out[lo:hi].copy_(torch.randn(hi - lo, generator=g).mul_(t.std).add_(t.mean))

        return out.view(t.shape), [self.pool.submit(fill, i) for i in range(-(-n // CHUNK_ELEMENTS))]

    def draw(self, tensors: list[TensorSpec]):
        """Yields ``(spec, tensor)`` for ``tensors`` in order."""
        if self.pool is None:
            for t in tensors:
                yield t, self._draw_cuda(t)
            return
        pending: deque = deque()
        inflight = 0
        for t in tensors:
            while pending and (inflight + t.nbytes > self.ahead_bytes or len(pending) >= 4 * self.threads):
                spec, x, futures = pending.popleft()
                for f in futures:
                    f.result()
                inflight -= spec.nbytes
                yield spec, x
            pending.append((t, *self._submit_cpu(t)))
            inflight += t.nbytes
        while pending:
            spec, x, futures = pending.popleft()
            for f in futures:
                f.result()
            yield spec, x

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
