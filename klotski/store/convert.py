"""Rewrite an HF-layout checkpoint into a packed expert store (see :mod:`klotski.store`).

Crash safety: every file is written under ``<name>.tmp``, fsynced and renamed; ``manifest.json`` is removed
before anything else is written and written (atomically) last. A conversion killed at any point leaves a
directory without a manifest, which :class:`klotski.store.ExpertStore` refuses to open
(:class:`StoreIncompleteError`); converting again into it replaces the leftovers.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import torch

from klotski.checkpoint import DTYPES, SafetensorsIndex, TensorInfo
from klotski.model.quant import Fp8Weight, scale_name
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights, expert_names
from klotski.quant.int4 import Int4Weight
from klotski.store.manifest import (ALIGNMENT, CHECKSUM_ALGO, FORMAT, MANIFEST_NAME, NON_EXPERT_NAME, VERSION,
                                    ExpertRecord, PackedTensor, checksum, dtype_name, fsync_dir,
                                    write_json_atomic)

SAFETENSORS_NAMES = {v: k for k, v in DTYPES.items()}
# Small files copied verbatim (config, tokenizer, generation settings).
COPIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
SKIPPED = ("model.safetensors.index.json",)

Progress = Callable[[str, int, int], None]  # (what, done, total)


def layer_file_name(layer: int) -> str:
    return f"experts-layer{layer:03d}.bin"


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


class _AtomicFile:
    """``open(path + '.tmp', 'wb')``; ``commit()`` fsyncs and renames onto ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".tmp"
        self.f = open(self.tmp, "wb")

    def write(self, data) -> None:
        self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def commit(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.tell()
        self.f.close()
        os.rename(self.tmp, self.path)
        return size


SCALE_ALIGNMENT = 16  # fp32 scales start on an aligned offset inside the record


def _write_layer(weights: CheckpointWeights, layer: int, out_dir: str,
                 read_expert: Callable | None = None) -> tuple[list[ExpertRecord], int]:
    """``read_expert(layer, e) -> (w13, w2)``: the checkpoint's experts as stored by default; an int4 reader
    (:mod:`klotski.store.quantize`) gives Int4Weight pairs."""
    name = layer_file_name(layer)
    out = _AtomicFile(os.path.join(out_dir, name))
    records = []
    read_expert = read_expert or weights.read_expert_stored  # fp8 weights stay fp8 (+ scales)
    for e in range(weights.spec.num_experts):
        w13, w2 = read_expert(layer, e)
        start = out.tell()
        assert start % ALIGNMENT == 0
        pos = 0

        def put(label: str, t: torch.Tensor, align: int = 1) -> PackedTensor:
            nonlocal pos
            pad = -pos % align
            out.write(b"\0" * pad)
            pos += pad
            data = _as_bytes(t)
            out.write(data)
            packed = PackedTensor(f"layer {layer} expert {e} {label}", pos, len(data), t.dtype, tuple(t.shape),
                                  checksum(data))
            pos += len(data)
            return packed

        fp8, int4 = isinstance(w13, Fp8Weight), isinstance(w13, Int4Weight)
        if fp8 != isinstance(w2, Fp8Weight) or int4 != isinstance(w2, Int4Weight):
            raise ValueError(f"layer {layer} expert {e}: w13 and w2 must both be fp8, both int4 or both unquantized")
        p13 = put("w13", w13.weight if fp8 else w13.qweight if int4 else w13)
        p2 = put("w2", w2.weight if fp8 else w2.qweight if int4 else w2)
        extra = {}
        if int4:
            extra = dict(w13_scale=put("w13_scale", w13.scales, SCALE_ALIGNMENT),
                         w2_scale=put("w2_scale", w2.scales, SCALE_ALIGNMENT), group_size=w13.group_size)
            if w13.zeros is not None:
                extra.update(w13_zeros=put("w13_zeros", w13.zeros, SCALE_ALIGNMENT),
                             w2_zeros=put("w2_zeros", w2.zeros, SCALE_ALIGNMENT))
        if fp8:
            extra = dict(w13_scale=put("w13_scale", w13.scale_inv, SCALE_ALIGNMENT),
                         w2_scale=put("w2_scale", w2.scale_inv, SCALE_ALIGNMENT),
                         w13_rows=w13.rows, block=w13.block)
        pad = -pos % ALIGNMENT
        if pad:
            out.write(b"\0" * pad)
        records.append(ExpertRecord(layer, e, out.path, start, pos, p13, p2, **extra))
    return records, out.commit()


def _write_safetensors(index: SafetensorsIndex, infos: list[TensorInfo], path: str) -> int:
    """Stream tensors (bytes copied verbatim) into a safetensors file, header padded to 8 bytes."""
    header, offset = {}, 0
    for info in infos:
        header[info.name] = {"dtype": SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    header["__metadata__"] = {"format": "pt", "producer": "klotski convert"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = _AtomicFile(path)
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    for info in infos:
        out.write(_as_bytes(index.read(info)))
    return out.commit()


def convert_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       progress: Progress | None = None, quantize: str | None = None, group_size: int = 128,
                       symmetric: bool = False, clip_search: bool = False) -> dict:
    """Convert ``model_dir`` (config.json + safetensors, either expert key layout) into a packed store in
    ``out_dir`` (created if needed; an earlier store there is replaced). Returns the manifest dict.

    ``quantize="int4"`` stores the routed experts as int4 (round-to-nearest, groups of ``group_size`` input
    columns, ``symmetric`` or with zero points, ``clip_search``: per-group range search;
    :mod:`klotski.store.quantize`)."""
    from klotski.store.quantize import int4_expert_reader

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError(f"output directory must differ from the model directory ({model_dir})")
    spec = ModelSpec.from_pretrained(model_dir)
    index = SafetensorsIndex(model_dir)
    weights = CheckpointWeights(index, spec)  # validates names and shapes against the config
    read_expert, quantization = int4_expert_reader(weights, quantize, group_size, symmetric, clip_search)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):  # from here on the directory is not a store until we finish
        os.remove(manifest_path)
        fsync_dir(out_dir)
    report = progress or (lambda what, done, total: None)

    layers = spec.moe_layers
    records: list[ExpertRecord] = []
    files: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        report("experts", i, len(layers))
        recs, size = _write_layer(weights, layer, out_dir, read_expert)
        records += recs
        files[layer_file_name(layer)] = {"nbytes": size}
    report("experts", len(layers), len(layers))

    expert_keys = set()
    for layer in layers:
        names = expert_names(spec, layer, weights.layout)
        expert_keys.update(names)
        expert_keys.update(scale_name(n) for n in names)  # fp8 scales travel in the expert records
    others = [index[n] for n in sorted(index.names()) if n not in expert_keys]
    report("non-expert tensors", 0, 1)
    size = _write_safetensors(index, others, os.path.join(out_dir, NON_EXPERT_NAME))
    files[NON_EXPERT_NAME] = {"nbytes": size}
    report("non-expert tensors", 1, 1)

    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and name.endswith(COPIED_SUFFIXES) and name not in SKIPPED and name != MANIFEST_NAME:
            shutil.copyfile(src, os.path.join(out_dir, name + ".tmp"))
            with open(os.path.join(out_dir, name + ".tmp"), "rb+") as f:
                os.fsync(f.fileno())
            os.rename(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    fsync_dir(out_dir)

    dtypes = sorted({dtype_name(r.w13.dtype) for r in records})
    manifest = {
        "format": FORMAT, "version": VERSION, "alignment": ALIGNMENT, "checksum": CHECKSUM_ALGO,
        "model_type": spec.model_type, "num_experts": spec.num_experts, "moe_layers": list(layers),
        "hidden_size": spec.hidden_size, "moe_intermediate_size": spec.moe_intermediate_size,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "fp8_block": list(spec.fp8_block) if spec.fp8_block and quantization is None else None,
        "quantization": quantization,
        "source": {"model_dir": os.path.abspath(model_dir), "expert_layout": "fused" if weights.layout.fused
                   else "per-expert"},
        "non_expert": NON_EXPERT_NAME,
        "files": files,
        "experts": [r.to_json(os.path.basename(r.path)) for r in records],
    }
    write_json_atomic(manifest_path, manifest)
    return manifest
