"""Pre-quantized 4-bit checkpoints (GPTQ, AWQ, compressed-tensors) read into the int4 slot layout.

:func:`parse_int4_checkpoint` reads a config's ``quantization_config`` and returns an :class:`Int4Format`, None for
a checkpoint without one, or raises :class:`UnsupportedQuantization` naming the setting and listing what is
supported. Each ``*_to_int4`` function turns one linear layer's stored tensors (N outputs, K inputs, group G)
into an :class:`~klotski.quant.Int4Weight` [N, K] computing the same weights:

* GPTQ (``quant_method "gptq"``, ``bits 4``, ``desc_act false``): ``qweight`` [K/8, N] int32, eight codes per
  int32 along K (row k = 8r + i at bits 4i..4i+3); ``qzeros`` [K/G, N/8] int32 packed the same way along N;
  ``scales`` [K/G, N]. ``checkpoint_format "gptq"`` (v1) stores each zero point minus one (so v1 zeros are
  1..16 once read); ``"gptq_v2"`` stores them as they are. Symmetric checkpoints use zero point 8.
  ``g_idx`` (when present) must be the trivial k // G (no act-order).
* AWQ GEMM (``quant_method "awq"``, ``version "gemm"``): ``qweight`` [K, N/8] int32 packed along N with the
  columns of each int32 in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column ``AWQ_ORDER[i]``);
  ``qzeros`` [K/G, N/8] packed the same way; ``scales`` [K/G, N]; W = (q - z) * s.
* compressed-tensors ``pack-quantized`` W4A16 (``num_bits 4``, ``type int``, ``strategy group``):
  ``weight_packed`` [N, K/8] int32, eight codes per int32 along K, low bits first, each the signed value plus
  8; ``weight_scale`` [N, K/G]; asymmetric: ``weight_zero_point`` [N/8, K/G] int32 packed along N (signed plus
  8), W = (q - z) * s; symmetric: W = (q - 8) * s.

The slot layout keeps zero points as one uint8 per group (:mod:`klotski.quant.int4`), which holds GPTQ v1's
zero point 16 as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.quant.int4 import Int4Weight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8
SUPPORTED = ("gptq (bits 4, desc_act false, sym or asym, checkpoint_format gptq or gptq_v2)",
             "awq (bits 4, version gemm, zero_point true or false)",
             "compressed-tensors (format pack-quantized, weights num_bits 4 type int strategy group, "
             "no input_activations: W4A16)")


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization_config names a format or setting Klotski does not read."""


@dataclass(frozen=True)
class Int4Format:
    method: str  # "gptq" | "awq" | "compressed-tensors"
    group_size: int  # -1: one group over the whole input dim
    symmetric: bool
    gptq_v2: bool = False


def _refuse(where: str, what: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"{where}: {what} is not supported; supported 4-bit checkpoints: "
                                   + "; ".join(SUPPORTED) + " (and fp8 block-scaled, quant_method 'fp8')")


def parse_int4_checkpoint(config: dict) -> Int4Format | None:
    """The 4-bit format of ``config``'s quantization_config; None when it has none or it is fp8 (read by
    :mod:`klotski.model.quant`)."""
    q = config.get("quantization_config")
    if not q:
        return None
    where = f"config.json ({config.get('model_type')}) quantization_config"
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        return None
    if method == "gptq":
        bits = int(q.get("bits", 0))
        if bits != 4:
            raise _refuse(where, f"gptq bits {bits}")
        if q.get("desc_act"):
            raise _refuse(where, "gptq desc_act true (act-order: groups follow g_idx, not k // group_size)")
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(where, f"gptq checkpoint_format {fmt!r}")
        return Int4Format("gptq", int(q.get("group_size", 128)), bool(q.get("sym", True)), fmt == "gptq_v2")
    if method == "awq":
        bits = int(q.get("bits", q.get("w_bit", 0)))
        if bits != 4:
            raise _refuse(where, f"awq bits {bits}")
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(where, f"awq version {version!r}")
        return Int4Format("awq", int(q.get("group_size", q.get("q_group_size", 128))),
                          not bool(q.get("zero_point", True)))
    if method == "compressed-tensors":
        fmt = str(q.get("format", "")).lower()
        if fmt != "pack-quantized":
            raise _refuse(where, f"compressed-tensors format {fmt!r}")
        groups = list((q.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise _refuse(where, f"compressed-tensors with {len(groups)} config_groups (one W4A16 group is read)")
        g = groups[0]
        w = g.get("weights") or {}
        if g.get("input_activations"):
            raise _refuse(where, "compressed-tensors input_activations quantization (only weight-only W4A16)")
        if int(w.get("num_bits", 0)) != 4 or str(w.get("type", "int")) != "int":
            raise _refuse(where, f"compressed-tensors weights num_bits {w.get('num_bits')} type {w.get('type')!r}")
        if str(w.get("strategy", "")).lower() != "group":
            raise _refuse(where, f"compressed-tensors weights strategy {w.get('strategy')!r}")
        return Int4Format("compressed-tensors", int(w["group_size"]), bool(w.get("symmetric", True)))
    raise _refuse(where, f"quant_method {q.get('quant_method')!r}")


# ---- unpacking -------------------------------------------------------------------------------------------
def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words of eight 4-bit codes (code i at bits 4i..4i+3) -> uint8 codes, 8x longer along ``dim``."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed 4-bit codes must be int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., 8] (arithmetic shift: masked, so sign-free)
    codes = codes.to(torch.uint8)
    if dim in (-1, packed.dim() - 1):
        return codes.flatten(-2)
    moved = codes.movedim(-1, dim + 1)  # [..., d, 8, ...]
    return moved.flatten(dim, dim + 1)


def _group(k: int, group_size: int) -> int:
    return k if group_size in (-1, 0) else group_size


def _int4(codes_nk: torch.Tensor, scales_ng: torch.Tensor, zeros_ng: torch.Tensor | None, k: int,
          group_size: int) -> Int4Weight:
    return Int4Weight(pack_int4(codes_nk).contiguous(), scales_ng.contiguous(),
                      None if zeros_ng is None else zeros_ng.to(torch.uint8).contiguous(), _group(k, group_size))


def gptq_to_int4(qweight, qzeros, scales, fmt: Int4Format, g_idx=None) -> Int4Weight:
    """GPTQ ``qweight`` [K/8, N], ``qzeros`` [K/G, N/8], ``scales`` [K/G, N] -> Int4Weight [N, K]."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    group = _group(k, fmt.group_size)
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group):
        raise UnsupportedQuantization("gptq g_idx is not k // group_size (an act-order checkpoint): not supported")
    codes = unpack_int32(qweight, 0)  # [K, N]
    zeros = None
    if not fmt.symmetric:
        z = unpack_int32(qzeros, 1)[:, :n].to(torch.int16)  # [K/G, N]
        zeros = (z if fmt.gptq_v2 else z + 1).t()
    return _int4(codes.t(), scales.t(), zeros, k, fmt.group_size)


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C/8] -> uint8 [R, C] in column order."""
    nibbles = unpack_int32(packed, -1).view(packed.shape[0], -1, 8)  # nibble i of each word
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles  # nibble i -> column AWQ_ORDER[i]
    return out.flatten(-2)


def awq_to_int4(qweight, qzeros, scales, fmt: Int4Format) -> Int4Weight:
    """AWQ GEMM ``qweight`` [K, N/8], ``qzeros`` [K/G, N/8], ``scales`` [K/G, N] -> Int4Weight [N, K]."""
    k = qweight.shape[0]
    codes = _awq_columns(qweight)  # [K, N]
    zeros = None if fmt.symmetric else _awq_columns(qzeros).t()
    return _int4(codes.t(), scales.t(), zeros, k, fmt.group_size)


def compressed_tensors_to_int4(weight_packed, weight_scale, fmt: Int4Format, weight_zero_point=None,
                               weight_shape=None) -> Int4Weight:
    """pack-quantized ``weight_packed`` [N, K/8], ``weight_scale`` [N, K/G] (+ ``weight_zero_point``
    [N/8, K/G]) -> Int4Weight [N, K]."""
    n = weight_packed.shape[0]
    codes = unpack_int32(weight_packed, 1)
    k = int(weight_shape[1]) if weight_shape is not None else codes.shape[1]
    codes = codes[:, :k]
    zeros = None
    if not fmt.symmetric:
        if weight_zero_point is None:
            raise ValueError("asymmetric compressed-tensors weight without weight_zero_point")
        zeros = unpack_int32(weight_zero_point, 0)[:n]
    return _int4(codes, weight_scale, zeros, k, fmt.group_size)
