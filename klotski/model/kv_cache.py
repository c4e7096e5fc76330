"""Dense per-layer KV cache for a batch of left-padded sequences.

Layout per layer: ``keys``/``values`` [B, kv_heads, capacity, head_dim]. All sequences of the batch append
at the same column (left padding); ``pad`` [B] counts each sequence's leading padding columns. MLA caches
store their own per-layer tensors through the same ``layers`` list (see klotski.model.mla).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, capacity: int, pad: torch.Tensor):
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.capacity = capacity
        self.pad = pad  # [B] int64 on the compute device
        self.length = 0  # columns filled so far
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def buffer(self, layer: int, name: str, shape_tail: tuple[int, ...], seq_dim_first: bool, like: torch.Tensor):
        """Lazily allocate layer ``name`` as [B, *shape_tail] with ``capacity`` in the sequence dim."""
        buf = self.layers[layer].get(name)
        if buf is None:
            shape = (self.batch_size, *shape_tail)
            buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.layers[layer][name] = buf
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def key_mask(self, q_len: int, device) -> torch.Tensor:
        """Boolean [B, 1, q_len, kv_len] attention mask for ``q_len`` new columns after ``self.length``.

        A query sees keys that are not padding and not in its future; a padding query sees itself only
        (its output is discarded, this just keeps softmax finite).
        """
        start = self.length
        kv_len = start + q_len
        cols = torch.arange(kv_len, device=device)
        rows = torch.arange(start, kv_len, device=device)
        causal = cols[None, :] <= rows[:, None]  # [q, kv]
        valid = cols[None, :] >= self.pad[:, None]  # [B, kv]
        mask = causal[None] & valid[:, None, :]
        mask |= (cols[None, :] == rows[:, None])[None]
        return mask[:, None]

    def query_valid(self, q_len: int, device) -> torch.Tensor:
        """[B, q_len] bool: which of the ``q_len`` new columns are tokens (not left padding)."""
        return query_valid(self.length, self.pad, q_len, device)

    def positions(self, q_len: int, device) -> torch.Tensor:
        """[B, q_len] rotary positions of the new columns (padding columns get position 0)."""
        cols = torch.arange(self.length, self.length + q_len, device=device)
        return (cols[None, :] - self.pad[:, None]).clamp(min=0)


def query_valid(length: int, pad: torch.Tensor, q_len: int, device) -> torch.Tensor:
    """[B, q_len] bool: which of ``q_len`` new columns after ``length`` are tokens, for rows left-padded by
    ``pad`` [B] (a padding column's output is computed and discarded)."""
    cols = torch.arange(length, length + q_len, device=device)
    return cols[None, :] >= pad[:, None]
