"""fp8 block-scaled weights (DeepSeek-V3's checkpoint format): config parsing, scale names, dequantization.

A quantized linear weight ``W`` [out, in] is stored as ``float8_e4m3fn`` with ``W_scale_inv`` (fp32)
[ceil(out / b0), ceil(in / b1)] beside it, ``(b0, b1)`` the config's ``weight_block_size``; the real weight is
``fp32(W[r, c]) * scale_inv[r // b0, c // b1]``. Klotski dequantizes to the compute dtype when a weight lands
on the device (:func:`dequantize_fp8_block`, the only place the arithmetic is written), and keeps fp8 + scales
wherever the weight is stored or streamed (host tier, disk tier, packed store).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from klotski.model.fp8_blocks import SCALE_SUFFIX, scale_name, scale_shape  # noqa: F401 (torch-free, re-exported)

FP8_DTYPE = torch.float8_e4m3fn
QUANT_METHODS = ("fp8",)


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize one block-scaled fp8 matrix.

    weight [R, C] float8 (any device), scale_inv [ceil(R / b0), ceil(C / b1)] (float; used as fp32, same device),
    block (b0, b1). Returns ``fp32(weight) * scale_inv`` broadcast over 128x128-style blocks (partial blocks at
    the bottom / right edge use their block's scale): a new fp32 [R, C] tensor, or written into ``out``
    ([R, C], any float dtype, same device; rounded once from the fp32 product). Works one row block at a time,
    so the fp32 temporaries stay at ``b0 * C`` elements.
    """
    if weight.dim() != 2:
        raise ValueError(f"dequantize_fp8_block: weight must be 2-D, got shape {list(weight.shape)}")
    R, C = weight.shape
    want = scale_shape((R, C), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"dequantize_fp8_block: weight {list(weight.shape)} with block {list(block)} needs scale "
                         f"shape {list(want)}, got {list(scale_inv.shape)}")
    if out is None:
        out = torch.empty((R, C), dtype=torch.float32, device=weight.device)
    elif tuple(out.shape) != (R, C):
        raise ValueError(f"dequantize_fp8_block: out must have shape {[R, C]}, got {list(out.shape)}")
    b0, b1 = block
    scale = scale_inv.to(torch.float32)
    for rb in range(want[0]):
        r0, r1 = rb * b0, min(R, (rb + 1) * b0)
        cols = scale[rb].repeat_interleave(b1)[:C]  # [C]: each column's block scale
        out[r0:r1].copy_(weight[r0:r1].to(torch.float32) * cols)
    return out


@dataclass(frozen=True)
class Fp8Weight:
    """A stored fp8 weight: row pieces concatenated along dim 0, each with its own block scales.

    weight [R, C] float8; scale_inv [sum_i ceil(rows_i / b0), ceil(C / b1)] fp32 (the pieces' scales stacked
    in order); rows: rows of each piece (sum R) -- an expert's ``w13`` is (I, I) (gate, up) when the
    checkpoint stores them apart, (2I,) when fused. Pieces cannot share blocks: a piece whose row count is
    not a multiple of b0 ends in a partial block of its own.
    """

    weight: torch.Tensor
    scale_inv: torch.Tensor
    rows: tuple[int, ...]
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes

    def pieces(self):
        """(row0, row1, scale_row0, scale_row1) of each piece."""
        r = s = 0
        for n in self.rows:
            sn = math.ceil(n / self.block[0])
            yield r, r + n, s, s + sn
            r, s = r + n, s + sn

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [R, C] (or written into ``out``, rounded once to its dtype)."""
        if out is None:
            out = torch.empty(tuple(self.weight.shape), dtype=torch.float32, device=self.weight.device)
        for r0, r1, s0, s1 in self.pieces():
            dequantize_fp8_block(self.weight[r0:r1], self.scale_inv[s0:s1], self.block, out=out[r0:r1])
        return out

    def pin_memory(self) -> "Fp8Weight":
        return Fp8Weight(self.weight.pin_memory(), self.scale_inv.pin_memory(), self.rows, self.block)


def concat(parts: list) -> "torch.Tensor | Fp8Weight":
    """Row pieces (all tensors, or all Fp8Weight with one block size) concatenated along dim 0."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    if not all(isinstance(p, Fp8Weight) for p in parts) or len({p.block for p in parts}) != 1:
        raise ValueError("cannot concatenate fp8 and unquantized row pieces of one weight")
    return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale_inv for p in parts]),
                     tuple(r for p in parts for r in p.rows), parts[0].block)
