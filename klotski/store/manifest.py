"""The packed store's manifest: where each expert's bytes are, and their checksums.

``manifest.json``::

    {"format": "klotski-expert-store", "version": 1, "alignment": 4096, "checksum": "crc32",
     "model_type": ..., "num_experts": E, "moe_layers": [...], "dtype": "bfloat16",
     "files": {"experts-layer000.bin": {"nbytes": ...}, "non_expert.safetensors": {"nbytes": ..., "checksum": ...}},
     "experts": [{"layer": 0, "expert": 0, "file": "experts-layer000.bin", "offset": 0, "nbytes": N,
                  "tensors": {"w13": {"offset": 0, "nbytes": ..., "dtype": "bfloat16", "shape": [2I, H],
                                      "checksum": "crc32:1a2b3c4d"},
                              "w2":  {"offset": <w13 nbytes>, ...}}}, ...]}

A record's ``offset`` is absolute in its file and 4096-aligned; tensor offsets are relative to the record.

fp8 block-scaled checkpoints keep their fp8 bytes: the manifest has ``"fp8_block": [b0, b1]`` and each record
also holds ``w13_scale`` / ``w2_scale`` (fp32) after ``w2``, plus ``"w13_rows"`` (rows of each w13 piece: the
gate and up scales are stacked, each piece with its own blocks); :meth:`ExpertRecord.views` then gives
:class:`~klotski.model.quant.Fp8Weight` views that the runtime dequantizes into device buffers.

int4 stores (``klotski convert --quantize int4``, or a GPTQ / AWQ / compressed-tensors checkpoint) have
``"quantization": {"method": "int4", "bits": 4, "group_size": G, "symmetric": bool, "scale_dtype": ...}``;
each record's ``w13`` / ``w2`` are the packed codes (uint8 [2I, H/2] / [H, I/2]) followed by ``w13_scale`` /
``w2_scale`` ([2I, H/G] / [H, I/G]) and, when asymmetric, ``w13_zeros`` / ``w2_zeros`` (uint8, same shapes),
each 16-byte aligned; :meth:`ExpertRecord.views` gives :class:`~klotski.quant.Int4Weight` views, which the
runtime copies as they are into an int4 device pool (see :mod:`klotski.quant.int4`).
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import torch

from klotski.model.quant import Fp8Weight
from klotski.quant.int4 import Int4Weight
from klotski.store.directory import atomic_write

FORMAT = "klotski-expert-store"
VERSION = 1
ALIGNMENT = 4096
MANIFEST_NAME = "manifest.json"
NON_EXPERT_NAME = "non_expert.safetensors"
CHECKSUM_ALGO = "crc32"


class StoreError(ValueError):
    """A packed store is malformed or does not match its manifest."""


class StoreIncompleteError(StoreError, FileNotFoundError):
    """The directory is not a finished store (no manifest: never converted, or the conversion was interrupted)."""


class ChecksumError(StoreError):
    """A tensor's bytes do not match the checksum recorded at conversion."""


def checksum(data) -> str:
    """``"crc32:xxxxxxxx"`` of a bytes-like object (or a contiguous CPU tensor)."""
    if isinstance(data, torch.Tensor):
        data = data.contiguous().view(-1).view(torch.uint8).numpy()
    return f"{CHECKSUM_ALGO}:{zlib.crc32(memoryview(data).cast('B')) & 0xFFFFFFFF:08x}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown dtype {name!r} in manifest")
    return dtype


@dataclass(frozen=True)
class PackedTensor:
    """One tensor inside an expert record: ``offset`` relative to the record start."""

    name: str  # e.g. "layer 3 expert 5 w13"
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    checksum: str

    def to_json(self) -> dict:
        return {"offset": self.offset, "nbytes": self.nbytes, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "checksum": self.checksum}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "PackedTensor":
        return cls(name, int(d["offset"]), int(d["nbytes"]), parse_dtype(d["dtype"]), tuple(d["shape"]),
                   str(d["checksum"]))

    def view(self, record_bytes: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into a uint8 tensor holding the whole record."""
        return record_bytes[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class ExpertRecord:
    """One expert's bytes: ``nbytes`` at ``offset`` (4096-aligned) of ``path``; one read gets w13 and w2."""

    layer: int
    expert: int
    path: str
    offset: int
    nbytes: int
    w13: PackedTensor
    w2: PackedTensor
    # fp8 stores: the block scales, the rows of each w13 piece and the block (None / () otherwise)
    w13_scale: PackedTensor | None = None
    w2_scale: PackedTensor | None = None
    w13_rows: tuple[int, ...] = ()
    block: tuple[int, int] | None = None
    # int4 stores: codes in w13 / w2, group scales in w13_scale / w2_scale, zero points (None: symmetric)
    group_size: int | None = None
    w13_zeros: PackedTensor | None = None
    w2_zeros: PackedTensor | None = None

    @property
    def tensors(self) -> list[PackedTensor]:
        return [t for t in (self.w13, self.w2, self.w13_scale, self.w2_scale, self.w13_zeros, self.w2_zeros)
                if t is not None]

    def views(self, record_bytes: torch.Tensor):
        """(w13, w2) over a uint8 tensor holding the whole record: tensors, Fp8Weight for fp8 records,
        Int4Weight for int4 records."""
        w13, w2 = self.w13.view(record_bytes), self.w2.view(record_bytes)
        if self.group_size is not None:
            zeros = lambda t: None if t is None else t.view(record_bytes)  # noqa: E731
            return (Int4Weight(w13, self.w13_scale.view(record_bytes), zeros(self.w13_zeros), self.group_size),
                    Int4Weight(w2, self.w2_scale.view(record_bytes), zeros(self.w2_zeros), self.group_size))
        if self.block is None:
            return w13, w2
        return (Fp8Weight(w13, self.w13_scale.view(record_bytes), self.w13_rows, self.block),
                Fp8Weight(w2, self.w2_scale.view(record_bytes), (self.w2.shape[0],), self.block))

    def to_json(self, file_name: str) -> dict:
        tensors = {"w13": self.w13.to_json(), "w2": self.w2.to_json()}
        out = {"layer": self.layer, "expert": self.expert, "file": file_name, "offset": self.offset,
               "nbytes": self.nbytes, "tensors": tensors}
        if self.block is not None:
            tensors["w13_scale"], tensors["w2_scale"] = self.w13_scale.to_json(), self.w2_scale.to_json()
            out["w13_rows"] = list(self.w13_rows)
        if self.group_size is not None:
            tensors["w13_scale"], tensors["w2_scale"] = self.w13_scale.to_json(), self.w2_scale.to_json()
            if self.w13_zeros is not None:
                tensors["w13_zeros"], tensors["w2_zeros"] = self.w13_zeros.to_json(), self.w2_zeros.to_json()
        return out

    @classmethod
    def from_json(cls, root: str, d: dict, block: tuple[int, int] | None = None,
                  int4: dict | None = None) -> "ExpertRecord":
        layer, expert = int(d["layer"]), int(d["expert"])
        t = d["tensors"]
        name = f"layer {layer} expert {expert}"
        scales = {}
        if block is not None:
            if "w13_scale" not in t or "w2_scale" not in t or "w13_rows" not in d:
                raise StoreError(f"{name}: the store is fp8 (fp8_block {list(block)}) but the record has no "
                                 f"w13_scale / w2_scale / w13_rows")
            scales = dict(w13_scale=PackedTensor.from_json(f"{name} w13_scale", t["w13_scale"]),
                          w2_scale=PackedTensor.from_json(f"{name} w2_scale", t["w2_scale"]),
                          w13_rows=tuple(int(r) for r in d["w13_rows"]), block=tuple(block))
        if int4 is not None:
            scales = int4_record_fields(name, t, int4)
        return cls(layer, expert, os.path.join(root, d["file"]), int(d["offset"]), int(d["nbytes"]),
                   PackedTensor.from_json(f"{name} w13", t["w13"]), PackedTensor.from_json(f"{name} w2", t["w2"]),
                   **scales)


def int4_record_fields(name: str, t: dict, int4: dict) -> dict:
    """ExpertRecord keyword fields of an int4 record's tensors ``t`` (manifest ``quantization`` ``int4``)."""
    need = ["w13_scale", "w2_scale"] + ([] if int4["symmetric"] else ["w13_zeros", "w2_zeros"])
    missing = [k for k in need if k not in t]
    if missing:
        kind = "symmetric" if int4["symmetric"] else "asymmetric"
        raise StoreError(f"{name}: the store is int4 ({kind}, group {int4['group_size']}) but the record has no "
                         f"{' / '.join(missing)}")
    fields = {k: PackedTensor.from_json(f"{name} {k}", t[k]) for k in need}
    return dict(group_size=int(int4["group_size"]), **fields)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON through a unique temporary file, fsync, rename over ``path``, fsync the directory."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")
