"""Block-scale bookkeeping of fp8 block-scaled weights, torch-free (the planner sizes fp8 checkpoints with it).

A weight [..., out, in] stored in fp8 has a float32 scale ``<name>_scale_inv`` of shape
[..., ceil(out / b0), ceil(in / b1)] beside it, ``(b0, b1)`` the config's ``weight_block_size``. The
arithmetic (dequantization) lives in :mod:`klotski.model.quant`.
"""
from __future__ import annotations

import math

SCALE_SUFFIX = "_scale_inv"


def scale_name(name: str) -> str:
    """HF name of the block scale of weight ``name`` (``x.weight`` -> ``x.weight_scale_inv``)."""
    return name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Scale shape of a weight of ``shape`` [..., out, in]: [..., ceil(out / b0), ceil(in / b1)]."""
    if len(shape) < 2:
        raise ValueError(f"block-scaled weights are at least 2-D, got shape {list(shape)}")
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
