"""Experts quantized while a checkpoint is packed (``klotski convert --quantize int4``).

:func:`int4_expert_reader` gives the converter a ``read_expert(layer, e) -> (w13, w2)`` that returns
:class:`~klotski.quant.Int4Weight` pairs, and the manifest's ``quantization`` entry describing them. Each
expert's w13 [2I, H] and w2 [H, I] are quantized on their own (groups along the input dim K: H for w13, I for
w2), from the checkpoint's values (fp8 checkpoints: dequantized first); scales are stored in the checkpoint's
16-bit dtype, fp32 for fp32 checkpoints.

A pre-quantized 4-bit checkpoint (``weights.int4``: GPTQ / AWQ GEMM / compressed-tensors) is not quantized
again: its experts' codes, scales and zero points are converted into the slot layout as they are
(:meth:`CheckpointWeights.read_expert_int4`), with the checkpoint's group size, symmetry and scale dtype (the
``group_size`` / ``symmetric`` / ``clip_search`` arguments do not apply). w13 (K = hidden) and w2 (K =
intermediate) share one group size in the store: a per-channel checkpoint (group -1) is regrouped exactly to
the largest even common divisor of the two rows' lengths (:func:`klotski.quant.linears.regroup`).
"""
from __future__ import annotations

from typing import Callable

import torch

from klotski.model.weights import CheckpointWeights
from klotski.quant.int4 import Int4Weight, check_group, quantize_int4
from klotski.quant.linears import regroup
from klotski.store.manifest import dtype_name

QUANTIZE_CHOICES = ("int4",)
DEFAULT_GROUP_SIZE = 128


def scale_dtype_for(spec) -> torch.dtype:
    """The scales' dtype for a checkpoint: its 16-bit dtype, else fp32."""
    name = str(spec.torch_dtype or "").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def quantization_entry(group_size: int, symmetric: bool, scale_dtype: torch.dtype, source: str) -> dict:
    """The manifest's ``quantization`` value for int4 experts."""
    return {"method": "int4", "bits": 4, "group_size": int(group_size), "symmetric": bool(symmetric),
            "scale_dtype": dtype_name(scale_dtype), "source": source}


def int4_expert_reader(weights: CheckpointWeights, quantize: str | None, group_size: int = DEFAULT_GROUP_SIZE,
                       symmetric: bool = False, clip_search: bool = False) -> tuple[Callable | None, dict | None]:
    """(read_expert, manifest entry) for ``quantize`` ("int4"), or (None, None) for ``quantize=None``."""
    if quantize is None and weights.int4 is None:
        return None, None
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES} or None, got {quantize!r}")
    spec = weights.spec
    if not spec.moe_layers:
        raise ValueError(f"{weights.index.model_dir}: the model has no MoE layers: nothing to quantize")
    if weights.int4 is not None:
        return prequantized_expert_reader(weights)
    for what, k in (("hidden_size (w13's K)", spec.hidden_size), ("moe_intermediate_size (w2's K)",
                                                                   spec.moe_intermediate_size)):
        check_group(k, group_size, f"--group-size {group_size} for {spec.model_type} {what} = {k}")
    scale_dtype = scale_dtype_for(spec)

    def read_expert(layer: int, expert: int) -> tuple[Int4Weight, Int4Weight]:
        w13, w2 = weights.read_expert(layer, expert, torch.float32)
        return (quantize_int4(w13.float(), group_size, symmetric, scale_dtype, clip_search),
                quantize_int4(w2.float(), group_size, symmetric, scale_dtype, clip_search))

    return read_expert, quantization_entry(group_size, symmetric, scale_dtype, "rtn+clip" if clip_search else "rtn")


def prequantized_expert_reader(weights: CheckpointWeights) -> tuple[Callable, dict]:
    """(read_expert, manifest entry) converting a 4-bit checkpoint's experts as stored (see the module doc)."""
    import math

    spec, fmt = weights.spec, weights.int4
    layer = spec.moe_layers[0]
    w13_pieces, w2_info = weights.expert_pieces(layer, 0)
    layers = [p.int4 for p in (*w13_pieces, w2_info) if p.int4 is not None]
    if len(layers) != len(w13_pieces) + 1:
        weights.read_expert_int4(layer, 0)  # raises naming the unquantized expert weight
    g13, g2 = layers[0].group_size, layers[-1].group_size
    group = math.gcd(g13, g2)
    if group % 2:
        raise ValueError(f"{weights.index.model_dir}: {fmt.method} experts with group sizes {g13} (w13) and {g2} "
                         f"(w2) have no even common group size for the int4 store")
    scale_dtype = layers[0].scale_dtype

    def read_expert(layer: int, expert: int) -> tuple[Int4Weight, Int4Weight]:
        w13, w2 = weights.read_expert_int4(layer, expert)
        w13, w2 = regroup(w13, group), regroup(w2, group)
        if w13.scales.dtype != scale_dtype or w2.scales.dtype != scale_dtype:
            raise ValueError(f"layer {layer} expert {expert}: scales stored as {w13.scales.dtype} / "
                             f"{w2.scales.dtype}, expected {scale_dtype} as in the first expert")
        return w13, w2

    source = fmt.method + ("_v2" if fmt.gptq_v2 else "")
    return read_expert, quantization_entry(group, fmt.symmetric, scale_dtype, f"checkpoint:{source}")
