"""Lazy safetensors index: tensor name -> (file, absolute byte offset, nbytes, dtype, shape).

Reads only headers at open time; :meth:`SafetensorsIndex.read` reads one tensor (or a byte range of one, e.g.
a single expert of a fused 3-D expert tensor) with ``os.pread``, never the whole file. Works on single-file
and sharded (``model.safetensors.index.json``) checkpoints.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype strings -> (torch dtype, item size)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated or not what the model spec expects."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. ``offset`` is absolute in ``path``. An fp8 block-scaled weight carries
    where its scales live in ``scale_inv`` (attached by :class:`klotski.model.weights.CheckpointWeights`).
    A linear layer of a pre-quantized 4-bit checkpoint has no bytes of its own: its info carries the layer
    (``int4``, a :class:`klotski.quant.linears.QuantizedLinear`) and describes the dequantized tensor
    (``dtype``, ``shape``, ``nbytes``); it is read through ``CheckpointWeights.read_stored``, never raw."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale_inv: "TensorInfo | None" = None
    int4: object = None  # klotski.quant.linears.QuantizedLinear of a pre-quantized layer

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the tensor plus its block scales (what reading it moves)."""
        return self.nbytes + (self.scale_inv.nbytes if self.scale_inv is not None else 0)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def row_slice(self, index: int) -> "TensorInfo":
        """The contiguous sub-tensor ``t[index]`` of a tensor with a leading dimension (e.g. one expert)."""
        if self.int4 is not None:
            raise CheckpointError(f"{self.name}: a 4-bit quantized layer has no row slices")
        if not self.shape or not 0 <= index < self.shape[0]:
            raise IndexError(f"{self.name}: index {index} out of range for shape {list(self.shape)}")
        per = self.nbytes // self.shape[0]
        scale = self.scale_inv.row_slice(index) if self.scale_inv is not None else None
        return TensorInfo(f"{self.name}[{index}]", self.path, self.offset + index * per, per, self.dtype,
                          self.shape[1:], scale)


def read_header(path: str) -> tuple[dict, int]:
    """Parse a safetensors header. Returns (header dict, data start offset). Raises CheckpointError."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header ({size} bytes, need at least 8)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors header (header length {n}, file size {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    return header, 8 + n


def index_file(path: str) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated)"
            )
        out[name] = TensorInfo(name, path, data_start + begin, end - begin, dtype, tuple(meta["shape"]))
    return out


class SafetensorsIndex:
    """All tensors of a checkpoint directory, by name. Only headers are read here."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"model directory not found: {self.model_dir}")
        self.tensors: dict[str, TensorInfo] = {}
        self._identity: dict | None = None
        for path in self._files():
            for name, info in index_file(path).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.tensors[name].path} and {path}")
                self.tensors[name] = info

    def _files(self) -> list[str]:
        idx = os.path.join(self.model_dir, "model.safetensors.index.json")
        if os.path.isfile(idx):
            with open(idx) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [p for p in files if not os.path.isfile(os.path.join(self.model_dir, p))]
            if missing:
                raise FileNotFoundError(f"{idx} names shard(s) that do not exist: {', '.join(missing)}")
            return [os.path.join(self.model_dir, p) for p in files]
        files = sorted(str(p) for p in Path(self.model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.model_dir}")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in checkpoint {self.model_dir}") from None

    def names(self) -> list[str]:
        return list(self.tensors)

    def identity(self) -> dict:
        """This checkpoint's identity (:func:`klotski.store.identity.checkpoint_identity`), computed once."""
        if self._identity is None:
            from klotski.store.identity import checkpoint_identity

            self._identity = checkpoint_identity(self)
        return self._identity

    def read(self, name_or_info: str | TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (only its bytes) into a new CPU tensor, or into ``out`` (CPU, same dtype/numel)."""
        info = self[name_or_info] if isinstance(name_or_info, str) else name_or_info
        return read_tensor(info, out)


def read_tensor(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    if info.int4 is not None:
        raise CheckpointError(f"{info.name} is a 4-bit quantized layer of {info.path}: it has no bytes of its own "
                              f"to read (CheckpointWeights.read_stored dequantizes it)")
    if out is None:
        out = torch.empty(info.shape, dtype=info.dtype)
    elif out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes or not out.is_contiguous():
        raise ValueError(
            f"{info.name}: destination must be a contiguous {info.dtype} tensor of {info.nbytes} bytes, "
            f"got {out.dtype} {list(out.shape)}"
        )
    if info.nbytes == 0:
        return out.view(info.shape)
    buf = out.view(-1).view(torch.uint8).numpy()
    with open(info.path, "rb", buffering=0) as f:
        got = f.readinto(memoryview(buf)) if f.seek(info.offset) == info.offset else 0
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.path}: short read of {info.name!r} at offset {info.offset}: got {got} of {info.nbytes} bytes"
        )
    return out.view(info.shape)
