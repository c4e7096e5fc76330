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
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import torch

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

    def to_json(self, file_name: str) -> dict:
        return {"layer": self.layer, "expert": self.expert, "file": file_name, "offset": self.offset,
                "nbytes": self.nbytes, "tensors": {"w13": self.w13.to_json(), "w2": self.w2.to_json()}}

    @classmethod
    def from_json(cls, root: str, d: dict) -> "ExpertRecord":
        layer, expert = int(d["layer"]), int(d["expert"])
        t = d["tensors"]
        return cls(layer, expert, os.path.join(root, d["file"]), int(d["offset"]), int(d["nbytes"]),
                   PackedTensor.from_json(f"layer {layer} expert {expert} w13", t["w13"]),
                   PackedTensor.from_json(f"layer {layer} expert {expert} w2", t["w2"]))


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path.tmp``, fsync, rename over ``path``, fsync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
