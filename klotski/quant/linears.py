"""The quantized linear layers of a pre-quantized 4-bit checkpoint (GPTQ, AWQ GEMM, compressed-tensors).

In such a checkpoint a linear weight ``<base>.weight`` [N, K] is absent: its codes, scales and zero points are
stored under the format's own names beside it (see :mod:`klotski.quant.checkpoint_formats` for the layouts):

    gptq                ``<base>.qweight`` [K/8, N] int32, ``.scales`` [K/G, N], ``.qzeros`` [K/G, ceil(N/8)]
                        int32, optional ``.g_idx`` [K] (must be k // G: act-order is refused)
    awq                 ``<base>.qweight`` [K, N/8] int32, ``.scales`` [K/G, N], ``.qzeros`` [K/G, N/8] int32
    compressed-tensors  ``<base>.weight_packed`` [N, ceil(K/8)] int32, ``.weight_scale`` [N, K/G],
                        ``.weight_zero_point`` [ceil(N/8), K/G] int32 (asymmetric), ``.weight_shape`` [2]

:func:`find_quantized_linear` finds and shape-checks one such layer (given the logical [N, K] the model's
config implies) and returns a :class:`QuantizedLinear`; :meth:`QuantizedLinear.read` reads it into an
:class:`~klotski.quant.Int4Weight` in the slot layout. Which layers are quantized is the checkpoint's business
(routers, embeddings and the LM head usually are not): any linear may be.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.quant.checkpoint_formats import (Int4Format, UnsupportedQuantization, awq_to_int4,
                                              compressed_tensors_to_int4, gptq_to_int4)
from klotski.quant.int4 import SCALE_DTYPES, Int4Weight

# role -> checkpoint suffix, per format; the first role marks the layer as quantized
ROLES = {
    "gptq": {"qweight": "qweight", "scales": "scales", "qzeros": "qzeros", "g_idx": "g_idx"},
    "awq": {"qweight": "qweight", "scales": "scales", "qzeros": "qzeros"},
    "compressed-tensors": {"weight_packed": "weight_packed", "weight_scale": "weight_scale",
                           "weight_zero_point": "weight_zero_point", "weight_shape": "weight_shape",
                           "weight_g_idx": "weight_g_idx"},
}
OPTIONAL = {"g_idx", "weight_shape"}  # present or not; zero points are required when asymmetric (GPTQ writes
# them for symmetric layers too: read and not used)


def _ceil8(x: int) -> int:
    return -(-x // 8)


def group_of(fmt: Int4Format, k: int) -> int:
    """The group size of a layer with ``k`` inputs (-1 / 0 in the config: one group over the whole row)."""
    return k if fmt.group_size in (-1, 0) else fmt.group_size


def expected_part_shapes(fmt: Int4Format, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """role -> shape of the stored tensors of an [N, K] layer (roles that are not stored absent)."""
    groups = k // group_of(fmt, k)
    if fmt.method == "gptq":
        out = {"qweight": (k // 8, n), "scales": (groups, n), "qzeros": (groups, _ceil8(n)), "g_idx": (k,)}
    elif fmt.method == "awq":
        out = {"qweight": (k, n // 8), "scales": (groups, n), "qzeros": (groups, n // 8)}
    else:
        out = {"weight_packed": (n, _ceil8(k)), "weight_scale": (n, groups), "weight_zero_point": (_ceil8(n), groups),
               "weight_shape": (2,)}
    return out


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """One 4-bit linear layer of a checkpoint: its logical ``name`` (``<base>.weight``), [N, K] ``shape``
    and the stored tensors by role (:class:`~klotski.checkpoint.TensorInfo`)."""

    name: str
    fmt: Int4Format
    shape: tuple[int, int]
    parts: dict  # role -> TensorInfo

    @property
    def group_size(self) -> int:
        return group_of(self.fmt, self.shape[1])

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.parts["weight_scale" if self.fmt.method == "compressed-tensors" else "scales"].dtype

    @property
    def stored_nbytes(self) -> int:
        return sum(i.nbytes for i in self.parts.values())

    def part_names(self) -> list[str]:
        return [i.name for i in self.parts.values()]

    def read(self, index) -> Int4Weight:
        """The layer as an Int4Weight [N, K] (reads only its tensors from ``index``, a SafetensorsIndex)."""
        t = {role: index.read(info) for role, info in self.parts.items()}
        n, k = self.shape
        try:
            if self.fmt.method == "gptq":
                w = gptq_to_int4(t["qweight"], t.get("qzeros"), t["scales"], self.fmt, t.get("g_idx"))
            elif self.fmt.method == "awq":
                w = awq_to_int4(t["qweight"], t.get("qzeros"), t["scales"], self.fmt)
            else:
                shape = t.get("weight_shape")
                if shape is not None and [int(x) for x in shape.tolist()] != [n, k]:
                    raise ValueError(f"weight_shape {shape.tolist()} != the config's [{n}, {k}]")
                w = compressed_tensors_to_int4(t["weight_packed"], t["weight_scale"], self.fmt,
                                               t.get("weight_zero_point"), (n, k))
        except UnsupportedQuantization as e:
            raise UnsupportedQuantization(f"{self.name} ({self.fmt.method} tensors in "
                                          f"{next(iter(self.parts.values())).path}): {e}") from None
        except ValueError as e:
            raise ValueError(f"{self.name} ({self.fmt.method} tensors in {next(iter(self.parts.values())).path}): "
                             f"{e}") from None
        if w.shape != (n, k):
            raise ValueError(f"{self.name}: {self.fmt.method} tensors decode to {list(w.shape)}, expected [{n}, {k}]")
        return w


def find_quantized_linear(index, fmt: Int4Format, name: str, shape: tuple[int, ...]
                          ) -> tuple[QuantizedLinear | None, list[str]]:
    """(the layer, []) when ``name`` (an absent ``<base>.weight`` of logical ``shape`` [N, K]) is stored in
    ``fmt``'s tensors in ``index``; (None, []) when it is not stored that way; (None, problems) when its tensors
    are there but do not fit (each problem names the tensor, expected vs got)."""
    roles = ROLES[fmt.method]
    if not name.endswith(".weight") or len(shape) != 2:
        return None, []
    base = name[: -len(".weight")]
    marker = next(iter(roles))
    if f"{base}.{marker}" not in index:
        return None, []
    n, k = shape
    where = f"{fmt.method} layer {base!r} (logical weight [{n}, {k}])"
    group = group_of(fmt, k)
    if k % 8 or group % 2 or k % group or (fmt.method == "awq" and n % 8):
        need = "N and K multiples of 8" if fmt.method == "awq" else "K a multiple of 8"
        return None, [f"{where}: group_size {fmt.group_size} does not fit (needs {need} and K a multiple of an "
                      f"even group size)"]
    want = expected_part_shapes(fmt, n, k)
    parts, problems = {}, []
    for role, suffix in roles.items():
        pname = f"{base}.{suffix}"
        if pname not in index:
            if role in ("qzeros", "weight_zero_point") and not fmt.symmetric:
                problems.append(f"{where}: missing {pname!r} (zero points of an asymmetric checkpoint, expected "
                                f"shape {list(want[role])})")
            elif role not in OPTIONAL and role not in ("qzeros", "weight_zero_point", "weight_g_idx"):
                problems.append(f"missing tensor {pname!r} of {where} (expected shape {list(want[role])})")
            continue
        info = index[pname]
        if role == "weight_g_idx":
            problems.append(f"{where}: {pname!r} (activation-order group index) is not supported")
            continue
        if tuple(info.shape) != want[role]:
            problems.append(f"tensor {pname!r} in {info.path} of {where}: expected shape {list(want[role])}, got "
                            f"{list(info.shape)}")
        scale = role in ("scales", "weight_scale")
        if scale and info.dtype not in SCALE_DTYPES:
            problems.append(f"tensor {pname!r} in {info.path}: scales must be one of {SCALE_DTYPES}, got {info.dtype}")
        elif role in ("qweight", "qzeros", "weight_packed", "weight_zero_point", "g_idx") and info.dtype != torch.int32:
            problems.append(f"tensor {pname!r} in {info.path}: expected int32 (packed 4-bit codes), got {info.dtype}")
        parts[role] = info
    if problems:
        return None, problems
    return QuantizedLinear(name, fmt, (n, k), parts), []


def concat_rows(parts: list[Int4Weight]) -> Int4Weight:
    """Int4Weights [N_i, K] of one group size stacked along N (an expert's gate and up rows into w13)."""
    if len({p.group_size for p in parts}) != 1 or len({p.symmetric for p in parts}) != 1:
        raise ValueError("concat_rows: pieces must share group size and symmetry, got "
                         + ", ".join(p.describe() for p in parts))
    zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                      parts[0].group_size)


def regroup(w: Int4Weight, group_size: int) -> Int4Weight:
    """The same weights with groups of ``group_size`` (a divisor of ``w.group_size``): each scale and zero
    point repeated over the smaller groups (exact)."""
    if group_size == w.group_size:
        return w
    if w.group_size % group_size:
        raise ValueError(f"regroup: {group_size} does not divide the group size {w.group_size}")
    r = w.group_size // group_size
    zeros = None if w.zeros is None else w.zeros.repeat_interleave(r, dim=-1)
    return Int4Weight(w.qweight, w.scales.repeat_interleave(r, dim=-1), zeros, group_size)
