"""Where one MoE layer's routed experts live on disk, and how to read one expert without touching the others.

Two sources give the same interface:

* :class:`CheckpointExperts`: the Hugging Face checkpoint itself (per-expert ``w1/w3/w2`` or
  ``gate_proj/up_proj/down_proj`` keys, or fused 3-D ``gate_up_proj`` / ``down_proj``), through
  :class:`klotski.model.weights.CheckpointWeights`: an expert is two or three byte ranges (gate rows, up rows,
  down) of the safetensors files;
* :class:`StoreExperts`: the packed expert store (``klotski convert``), one 4 KiB-aligned record per expert,
  read with one request.

``read_staged(expert, reader, slot)`` reads one expert's bytes into a staging :class:`klotski.io.Slot` (each
byte range at a 4096-aligned place, so O_DIRECT reads work) and returns views over the slot:
``(w13 parts, w2)``, the w13 parts in row order (gate rows, then up rows) adding up to [2I, H], w2 [H, I], in
the stored dtype. ``read_host(expert)`` returns the same as new CPU tensors (for the host tier).
``expert_nbytes(expert)`` is what reading it moves; ``staging_bytes`` the slot size that holds any expert.
fp8 block-scaled experts are refused here (the offloaded-experts module computes in the model's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.checkpoint import TensorInfo

ALIGN = 4096


@dataclass(frozen=True)
class ExpertShape:
    """One layer's routed experts: ``num_experts`` experts of w13 [2I, H] and w2 [H, I] stored as ``dtype``."""

    num_experts: int
    intermediate_size: int
    hidden_size: int
    dtype: torch.dtype


def _placed(pieces: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Destinations in a staging slot for byte ranges (file offset, nbytes): each at a 4096-aligned place
    with room for the aligned span of any range of that size (so every layer of one shape needs the same
    staging size). Returns (slot offsets, bytes needed)."""
    out, at = [], 0
    for _, nbytes in pieces:
        out.append(at)
        at += -(-(int(nbytes) + ALIGN - 1) // ALIGN) * ALIGN
    return out, at


def refuse_int4_checkpoint(weights) -> None:
    """OffloadedExperts computes in the model's dtype: a pre-quantized 4-bit checkpoint's experts are refused."""
    if weights.int4 is not None:
        raise ValueError(f"{weights.index.model_dir}: a pre-quantized {weights.int4.method} checkpoint's 4-bit "
                         f"experts are not supported by OffloadedExperts (it computes in the model's dtype); "
                         f"use klotski.LLM")


class CheckpointExperts:
    """Experts of MoE layer ``layer`` read straight from the checkpoint (a
    :class:`klotski.model.weights.CheckpointWeights`)."""

    def __init__(self, weights, layer: int):
        if weights.block is not None:
            raise ValueError(f"{weights.index.model_dir}: fp8 block-scaled experts are not supported by "
                             f"OffloadedExperts (it computes in the model's dtype); use klotski.LLM")
        refuse_int4_checkpoint(weights)
        spec = weights.spec
        if layer not in spec.moe_layers:
            raise ValueError(f"layer {layer} of {weights.index.model_dir} is not a MoE layer "
                             f"(MoE layers: {spec.moe_layers})")
        self.weights = weights
        self.layer = layer
        w13, w2 = weights.expert_pieces(layer, 0)
        self.shape = ExpertShape(spec.num_experts, spec.moe_intermediate_size, spec.hidden_size, w2.dtype)
        self.where = f"{weights.index.model_dir} layer {layer}"
        self._pieces = [self._ranges(e) for e in range(spec.num_experts)]
        self.staging_bytes = max(_placed([(p.offset, p.nbytes) for p in ps])[1] for ps in self._pieces)

    def _ranges(self, expert: int) -> list[TensorInfo]:
        w13, w2 = self.weights.expert_pieces(self.layer, expert)
        return [*w13, w2]

    def expert_nbytes(self, expert: int) -> int:
        return sum(p.nbytes for p in self._pieces[expert])

    def read_staged(self, expert: int, reader, slot) -> tuple[list[torch.Tensor], torch.Tensor]:
        pieces = self._pieces[expert]
        dests, _ = _placed([(p.offset, p.nbytes) for p in pieces])
        views = []
        for p, at in zip(pieces, dests):
            t = reader.read_now(p.path, p.offset, p.nbytes, into=slot.numpy(at))
            views.append(slot.tensor(p.dtype, p.shape, at + t.view_offset))
        return views[:-1], views[-1]

    def read_host(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights.read_expert(self.layer, expert)


class StoreExperts:
    """Experts of MoE layer ``layer`` read from a packed :class:`klotski.store.ExpertStore`."""

    def __init__(self, store, layer: int, intermediate_size: int, hidden_size: int):
        if store.fp8_block is not None:
            raise ValueError(f"expert store {store.root} holds fp8 experts, which OffloadedExperts does not "
                             f"support (it computes in the model's dtype); use klotski.LLM")
        if store.int4 is not None:
            raise ValueError(f"expert store {store.root} holds int4 experts, which OffloadedExperts does not "
                             f"support (it computes in the model's dtype); use klotski.LLM")
        if layer not in store.moe_layers:
            raise ValueError(f"layer {layer} is not in expert store {store.root} (MoE layers {store.moe_layers})")
        self.store = store
        self.layer = layer
        rec = store.expert(layer, 0)
        w13, w2 = rec.views(torch.empty(rec.nbytes, dtype=torch.uint8))
        if tuple(w13.shape) != (2 * intermediate_size, hidden_size) or tuple(w2.shape) != (hidden_size,
                                                                                            intermediate_size):
            raise ValueError(f"expert store {store.root} layer {layer}: experts are w13 {list(w13.shape)}, "
                             f"w2 {list(w2.shape)}; expected [{2 * intermediate_size}, {hidden_size}] and "
                             f"[{hidden_size}, {intermediate_size}] (converted from another checkpoint?)")
        self.shape = ExpertShape(store.num_experts, intermediate_size, hidden_size, w2.dtype)
        self.where = f"expert store {store.root} layer {layer}"
        self.staging_bytes = max(_placed([(store.expert(layer, e).offset, store.expert(layer, e).nbytes)])[1]
                                 for e in range(store.num_experts))

    def expert_nbytes(self, expert: int) -> int:
        return self.store.expert(self.layer, expert).nbytes

    def read_staged(self, expert: int, reader, slot) -> tuple[list[torch.Tensor], torch.Tensor]:
        rec = self.store.expert(self.layer, expert)
        t = reader.read_now(rec.path, rec.offset, rec.nbytes, into=slot)
        w13, w2 = self.store.views(rec, slot, t.view_offset)
        return [w13], w2

    def read_host(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.read_expert(self.layer, expert)
