"""The KV cache of one batch group: one :class:`KVCache` per micro-batch, on the device or in host memory.

The generation loop hands the executor a group of B = n x batch_size sequences; the group cache splits its
rows into n micro-batches (contiguous row ranges). With ``tier == "gpu"`` each micro-batch's cache lives on
the device and attention appends to it directly. With ``tier == "cpu"`` the caches live in host memory:
before a micro-batch's attention its layer is copied into a device staging buffer (``kv_load`` stream) and
after it the buffer is copied back (``kv_store``), FlexGen-style.
"""
from __future__ import annotations

import torch

from klotski.model.kv_cache import KVCache


class GroupCache:
    def __init__(self, num_layers: int, pad: torch.Tensor, num_batches: int, capacity: int, tier: str,
                 device: torch.device):
        B = pad.shape[0]
        n = max(1, min(num_batches, B))
        size = -(-B // n)
        self.rows = [(s, min(s + size, B)) for s in range(0, B, size)]
        self.tier = tier
        self.capacity = capacity
        self.batch_size = B
        self.pad = pad.to(device)
        self.length = 0
        home = device if tier == "gpu" else torch.device("cpu")
        self.micro = [KVCache(num_layers, e - s, capacity, pad[s:e].to(home)) for s, e in self.rows]
        self.device_pads = [self.pad[s:e] for s, e in self.rows]

    @property
    def num_batches(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.micro)
