"""Weight-only int4 with group-wise scales (and optional zero points): the slot layout the int4 kernels read.

One linear weight ``W`` [N, K] (N outputs, K inputs, group size G dividing K) is stored as

    qweight  [N, K/2]  uint8   two 4-bit codes per byte along K: code of column 2j in the low nibble,
                                column 2j+1 in the high nibble
    scales   [N, K/G]  float   (fp16 / bf16 / fp32; used as fp32)
    zeros    [N, K/G]  uint8   zero point per group (codes 0..15), or None: symmetric, zero point 8

and ``W[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]``, computed in fp32 (:func:`dequantize_int4_torch`,
the only place this arithmetic is written in torch; the host kernel ``klotski._C.dequantize_int4_host`` that
:func:`dequantize_int4` runs on the CPU and the Triton kernels do the same operations in the same order, so
their values equal this function's). Stacks of experts add leading dims
(``[S, N, K/2]`` ...). This is the family of layouts vLLM's Triton w4a16 MoE kernel reads (codes packed
along K, low nibble first, scales [N, K/G]); zero points here are one byte each, not packed. Packing them two per
byte was weighed and left: GPTQ ``gptq`` (v1) checkpoints store each zero point minus one, so a zero point 0
reads back as 16, which a nibble cannot hold (and those codes cannot be re-centred without changing the weights);
and the saving is small, 1 byte per 2 groups against G/2 code bytes + 2 scale bytes per group: 0.75 % of an
expert's bytes at group 128 with 16-bit scales, 2.6 % at group 32.

Round-to-nearest quantization (:func:`quantize_int4`) follows GPTQ's grid: asymmetric groups span
[min(w, 0), max(w, 0)] in 15 steps with an integer zero point; symmetric groups span [-amax, amax]
(scale = amax / 7.5, zero point 8), codes clamped to [0, 15].
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

BITS = 4
MAX_CODE = 15
SYMMETRIC_ZERO = 8
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] integer codes in [0, 15] -> [..., K/2] uint8 (even k in the low nibble). K must be even."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dim (K) must be even, got shape {list(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 codes in [0, 15] (inverse of :func:`pack_int4`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed codes must be uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def group_expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K/G] -> [..., K]: each group's value repeated over its G columns."""
    return t.repeat_interleave(group_size, dim=-1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(code - zero) * scale`` in fp32, rounded once to ``dtype``: [..., N, K/2] codes -> [..., N, K].

    On the host (contiguous CPU tensors) this runs ``klotski._C.dequantize_int4_host``, one pass over the codes
    with the same IEEE operations as :func:`dequantize_int4_torch` (bit-identical values, several times faster:
    the CPU path dequantizes every int4 expert it computes, ``bench/kernels/bench_int4_cpu.py``); elsewhere it
    is :func:`dequantize_int4_torch`. ``out``: a contiguous fp32 CPU tensor of the result's size to write into
    (host path, ``dtype`` fp32 only; a fresh multi-MiB buffer costs as much in page faults as the dequantization).
    """
    if _host_ready(qweight, scales, zeros):
        *lead, n, half = qweight.shape
        if out is None or dtype != torch.float32:
            out = torch.empty(*lead, n, 2 * half, dtype=torch.float32)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != qweight.numel() * 2:
            raise ValueError(f"dequantize_int4: out must be a contiguous float32 tensor of {qweight.numel() * 2} "
                             f"elements, got {out.dtype} {list(out.shape)}")
        else:
            out = out.view(*lead, n, 2 * half)
        from klotski import _C

        _C.dequantize_int4_host(qweight.data_ptr(), scales.data_ptr(), _SCALE_KIND[scales.dtype],
                                0 if zeros is None else zeros.data_ptr(), out.data_ptr(), qweight.numel() // half,
                                2 * half, group_size, torch.get_num_threads())
        return out if dtype == torch.float32 else out.to(dtype)
    return dequantize_int4_torch(qweight, scales, zeros, group_size, dtype)


_SCALE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # klotski._C.dequantize_int4_host


def _host_ready(qweight, scales, zeros) -> bool:
    ts = (qweight, scales) + (() if zeros is None else (zeros,))
    return (qweight.device.type == "cpu" and qweight.numel() > 0 and all(t.is_contiguous() for t in ts)
            and scales.dtype in _SCALE_KIND)


def dequantize_int4_torch(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                          group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The arithmetic of :func:`dequantize_int4` in torch ops (any device; the reference the host kernel and
    the Triton kernels match). The codes are split into their nibble planes in place of an interleaved copy
    and the group values broadcast over [..., N, K/G, G] views (no repeated scale tensors)."""
    *lead, n, half = qweight.shape
    k = 2 * half
    codes = torch.empty(*lead, n, half, 2, dtype=torch.uint8, device=qweight.device)
    torch.bitwise_and(qweight, 0xF, out=codes[..., 0])
    torch.bitwise_right_shift(qweight, 4, out=codes[..., 1])
    w = codes.view(*lead, n, k // group_size, group_size).to(torch.float32)
    w.sub_(SYMMETRIC_ZERO if zeros is None else zeros.to(torch.float32)[..., None])
    w.mul_(scales.to(torch.float32)[..., None])
    return w.view(*lead, n, k).to(dtype)


@dataclass(frozen=True)
class Int4Weight:
    """One int4 weight or a stack of them (leading dims: slots / experts); see the module docstring."""

    qweight: torch.Tensor  # [..., N, K/2] uint8
    scales: torch.Tensor  # [..., N, K/G] float
    zeros: torch.Tensor | None  # [..., N, K/G] uint8, or None (symmetric)
    group_size: int
    # a slot pool's (Int4Weight.empty) reusable fp32 buffer, shared with its slot views: dequantize(reuse=True)
    scratch: "DequantScratch | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_int4(self.qweight, self.scales, self.zeros, self.group_size)

    # ---- metadata ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape [..., N, K]."""
        return (*self.qweight.shape[:-1], self.qweight.shape[-1] * 2)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role (``qweight``, ``scales`` and, when asymmetric, ``zeros``)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    # ---- views and copies ----------------------------------------------------------------------------
    def __getitem__(self, index) -> "Int4Weight":
        """Index the leading (slot / expert) dims: ``pool[slot]`` is one expert's weight (a view)."""
        if self.qweight.dim() <= 2:
            raise IndexError("an unstacked Int4Weight [N, K] has no slot dim to index")
        return Int4Weight(self.qweight[index], self.scales[index],
                          None if self.zeros is None else self.zeros[index], self.group_size, self.scratch)

    def copy_(self, src: "Int4Weight", non_blocking: bool = False) -> "Int4Weight":
        """Copy ``src`` (same shape, group size and symmetry; any device) into this weight's tensors."""
        if not isinstance(src, Int4Weight):
            raise ValueError(f"Int4Weight.copy_: source must be an Int4Weight, got {type(src).__name__}")
        if (src.shape != self.shape or src.group_size != self.group_size or src.symmetric != self.symmetric
                or tuple(src.scales.shape) != tuple(self.scales.shape)):
            raise ValueError(f"Int4Weight.copy_: source {src.describe()} does not match destination {self.describe()}")
        self.qweight.copy_(src.qweight, non_blocking=non_blocking)
        self.scales.copy_(src.scales, non_blocking=non_blocking)
        if self.zeros is not None:
            self.zeros.copy_(src.zeros, non_blocking=non_blocking)
        return self

    def to(self, device=None, non_blocking: bool = False) -> "Int4Weight":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Int4Weight(move(self.qweight), move(self.scales), move(self.zeros), self.group_size)

    def pin_memory(self) -> "Int4Weight":
        return Int4Weight(self.qweight.pin_memory(), self.scales.pin_memory(),
                          None if self.zeros is None else self.zeros.pin_memory(), self.group_size)

    def clone(self) -> "Int4Weight":
        return Int4Weight(self.qweight.clone(), self.scales.clone(),
                          None if self.zeros is None else self.zeros.clone(), self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32, reuse: bool = False) -> torch.Tensor:
        """The weight values [..., N, K] in ``dtype`` (fp32 arithmetic, one rounding). ``reuse`` (a slot of a
        pool, fp32, host): written into the pool's scratch buffer, valid until this thread dequantizes another
        slot of the same pool (``fused_moe_torch`` uses each slot's weight before the next)."""
        out = None
        if reuse and self.scratch is not None and dtype == torch.float32 and self.device.type == "cpu":
            out = self.scratch.buffer(self.qweight.numel() * 2)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype, out)

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"int4 {list(self.shape)} group {self.group_size} {kind} scales {str(self.scales.dtype)[6:]} "
                f"on {self.device}")

    @staticmethod
    def empty(shape: tuple[int, ...], group_size: int, symmetric: bool, scale_dtype: torch.dtype,
              device=None) -> "Int4Weight":
        """An uninitialised weight of logical shape [..., N, K] (a device slot pool)."""
        *lead, n, k = shape
        check_group(k, group_size, f"int4 weight of shape {list(shape)}")
        groups = k // group_size
        return Int4Weight(torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device),
                          torch.empty(*lead, n, groups, dtype=scale_dtype, device=device),
                          None if symmetric else torch.empty(*lead, n, groups, dtype=torch.uint8, device=device),
                          group_size, DequantScratch())


class DequantScratch:
    """A per-thread fp32 host buffer that one pool's slots are dequantized into (grown on demand, kept)."""

    def __init__(self):
        self._local = threading.local()

    def buffer(self, numel: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < numel:
            buf = self._local.buf = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]


def check_group(k: int, group_size: int, what: str) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"{what}: group_size must be an even int >= 2, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{what}: the input dim K={k} is not a multiple of group_size {group_size}; "
                         f"choose a group size that divides every expert matrix's K (hidden and intermediate size)")


def check_int4(qweight, scales, zeros, group_size: int) -> None:
    """Shapes and dtypes of one int4 weight (ValueError naming the tensor, expected vs got)."""
    for name, t in (("qweight", qweight), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"int4 {name} must be a torch.Tensor, got {type(t).__name__}")
    if qweight.dtype != torch.uint8 or qweight.dim() < 2:
        raise ValueError(f"int4 qweight must be uint8 [..., N, K/2], got {qweight.dtype} {list(qweight.shape)}")
    k = qweight.shape[-1] * 2
    check_group(k, group_size, f"int4 qweight {list(qweight.shape)} (K={k})")
    want = (*qweight.shape[:-1], k // group_size)
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"int4 scales must be one of {SCALE_DTYPES}, got {scales.dtype}")
    if tuple(scales.shape) != want:
        raise ValueError(f"int4 scales must have shape {list(want)} ([..., N, K/G] for K={k}, G={group_size}), "
                         f"got {list(scales.shape)}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != want:
            got = f"{zeros.dtype} {list(zeros.shape)}" if isinstance(zeros, torch.Tensor) else type(zeros).__name__
            raise ValueError(f"int4 zeros must be uint8 {list(want)} or None (symmetric), got {got}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != qweight.device:
            raise ValueError(f"int4 {name} is on {t.device} but qweight is on {qweight.device}")


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # range shrink factors tried by ``clip_search``


def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  scale_dtype: torch.dtype | None = None, clip_search: bool = False) -> Int4Weight:
    """Round-to-nearest int4 of ``weight`` [..., N, K] per group of ``group_size`` columns.

    ``scale_dtype`` (default: the weight's dtype if 16-bit, else fp32) is what the scales are stored in; codes
    are computed against the stored (rounded) scale, so dequantization reproduces exactly what was chosen.
    ``clip_search``: per group, the range is also shrunk by each of :data:`CLIP_RATIOS` (outliers then clamp)
    and the one with the least squared error kept (1.0, plain round-to-nearest, when nothing beats it).
    """
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int4: weight must be a float [..., N, K] tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    *lead, n, k = weight.shape
    check_group(k, group_size, f"quantize_int4 of a {list(weight.shape)} weight")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = weight.to(torch.float32).reshape(*lead, n, k // group_size, group_size)
    if symmetric:
        amax = w.abs().amax(dim=-1)
        lo, hi = -amax, amax
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    best = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scale, zero, codes = _round_to_nearest(w, lo * ratio, hi * ratio, symmetric, scale_dtype)
        if best is None:
            best = (scale, zero, codes)
            if clip_search:
                best_err = _sq_error(w, scale, zero, codes)
            continue
        err = _sq_error(w, scale, zero, codes)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = tuple(torch.where(better[..., None] if t.dim() == codes.dim() else better, t, b)
                     for t, b in zip((scale, zero, codes), best))
    scale, zero, codes = best
    codes = codes.reshape(*lead, n, k)
    return Int4Weight(pack_int4(codes), scale.to(scale_dtype),
                      None if symmetric else zero.to(torch.uint8), group_size)


def _round_to_nearest(w, lo, hi, symmetric: bool, scale_dtype):
    """(scale fp32 [..., groups] as stored, zero point [..., groups], codes [..., groups, G]) for ranges lo..hi."""
    if symmetric:
        scale = torch.where(hi > 0, hi / 7.5, torch.ones_like(hi))
    else:
        scale = torch.where(hi > lo, (hi - lo) / MAX_CODE, torch.ones_like(hi))
    scale = scale.to(scale_dtype).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an underflow to 0 in the stored dtype
    if symmetric:
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        zero = torch.round(-lo / scale).clamp(0, MAX_CODE)
    codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, MAX_CODE)
    return scale, zero, codes


def _sq_error(w, scale, zero, codes) -> torch.Tensor:
    return ((codes - zero[..., None]) * scale[..., None] - w).square().sum(dim=-1)


def int4_nbytes(n: int, k: int, group_size: int, symmetric: bool, scale_bytes: int) -> int:
    """Stored bytes of one [N, K] int4 weight: codes + scales (+ zero points)."""
    groups = n * (k // group_size)
    return n * k // 2 + groups * scale_bytes + (0 if symmetric else groups)
