"""Rewrite an HF-layout checkpoint into a packed expert store (see :mod:`klotski.store`).

Safety:

* **Whose store**: the manifest records the source checkpoint's identity
  (:func:`klotski.store.identity.checkpoint_identity`). Converting into a directory that holds another
  checkpoint's store, or any non-empty directory that is not Klotski's, is refused unless ``replace=True``;
  a replacement first removes every file of the old store (layer files, copied config/tokenizer files,
  prefetch tables, leftovers), never files that are not Klotski's.
* **One writer**: the directory's exclusive lock (:class:`~klotski.store.directory.OffloadDir`) is held for
  the whole conversion; a second converter waits, then finds a finished store (kept when it is of the same
  checkpoint and ``reuse=True``) or is refused as above.
* **Crash safety**: ``manifest.json`` is removed before anything else is written and written (atomically)
  last; every file goes through a temporary name unique to the writer and is renamed when complete. A
  conversion killed at any point leaves a directory without a manifest, which
  :class:`klotski.store.ExpertStore` refuses to open (:class:`StoreIncompleteError`); the next conversion
  removes the leftovers. A conversion that fails (a full disk, an interrupt) removes what it wrote.
* **Space**: the bytes to write are checked against the free space first.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import zlib
from typing import Callable

import torch

from klotski.checkpoint import DTYPES, SafetensorsIndex, TensorInfo
from klotski.model.quant import Fp8Weight, scale_name
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights, expert_names
from klotski.quant.int4 import Int4Weight
from klotski.store.directory import DEFAULT_LOCK_TIMEOUT, OffloadDir, fsync_dir
from klotski.store.identity import IdentityMismatchError, checkpoint_identity, describe, same_source
from klotski.store.manifest import (ALIGNMENT, CHECKSUM_ALGO, FORMAT, MANIFEST_NAME, NON_EXPERT_NAME, VERSION,
                                    ExpertRecord, PackedTensor, StoreError, checksum, dtype_name,
                                    write_json_atomic)
from klotski.units import format_bytes

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
    """A temporary file unique to this writer beside ``path``; ``commit()`` fsyncs and renames it onto
    ``path``, ``discard()`` removes it. Keeps a crc32 of everything written."""

    def __init__(self, path: str, crc: bool = False):
        import tempfile

        self.path = path
        self.keep_crc = crc
        fd, self.tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                        dir=os.path.dirname(path))
        self.f = os.fdopen(fd, "wb")
        self.crc = 0

    def write(self, data) -> None:
        self.f.write(data)
        if self.keep_crc:
            self.crc = zlib.crc32(data, self.crc)

    def tell(self) -> int:
        return self.f.tell()

    @property
    def checksum(self) -> str:
        return f"{CHECKSUM_ALGO}:{self.crc & 0xFFFFFFFF:08x}"

    def commit(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.tell()
        self.f.close()
        os.rename(self.tmp, self.path)
        return size

    def discard(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:  # a failure (ENOSPC, an interrupt) leaves no temporary file behind
            self.discard()


SCALE_ALIGNMENT = 16  # fp32 scales start on an aligned offset inside the record


def _write_layer(weights: CheckpointWeights, layer: int, out_dir: str,
                 read_expert: Callable | None = None) -> tuple[list[ExpertRecord], int]:
    """``read_expert(layer, e) -> (w13, w2)``: the checkpoint's experts as stored by default; an int4 reader
    (:mod:`klotski.store.quantize`) gives Int4Weight pairs."""
    with _AtomicFile(os.path.join(out_dir, layer_file_name(layer))) as out:
        records = _write_records(weights, layer, out, read_expert or weights.read_expert_stored)
        return records, out.commit()


def _write_records(weights: CheckpointWeights, layer: int, out: _AtomicFile, read_expert) -> list[ExpertRecord]:
    records = []
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
    return records


def _write_safetensors(index: SafetensorsIndex, infos: list[TensorInfo], path: str,
                       read: Callable | None = None) -> tuple[int, str]:
    """Stream tensors (bytes copied verbatim; ``read(info)`` in place of ``index.read``: a 4-bit layer's
    dequantized values) into a safetensors file, header padded to 8 bytes.
    Returns (bytes, checksum of the whole file)."""
    header, offset = {}, 0
    for info in infos:
        header[info.name] = {"dtype": SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    header["__metadata__"] = {"format": "pt", "producer": "klotski convert"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _AtomicFile(path, crc=True) as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for info in infos:
            t = (read or index.read)(info)
            if t.dtype != info.dtype or tuple(t.shape) != tuple(info.shape):
                raise StoreError(f"{info.name}: read {t.dtype} {list(t.shape)}, expected {info.dtype} {list(info.shape)}")
            out.write(_as_bytes(t))
        return out.commit(), out.checksum


def _record_bytes(weights: CheckpointWeights, layer: int) -> int:
    """Bytes of one layer file: every expert record (fp8: + scales) padded to the alignment. A 4-bit checkpoint's
    experts: their stored codes + scales + zero points with a 10 % margin (the slot layout keeps a byte per zero
    point where the checkpoint packs eight in an int32; a per-channel checkpoint's scales are repeated)."""
    total = 0
    size = lambda p: int(p.int4.stored_nbytes * 1.1) if p.int4 is not None else p.stored_nbytes  # noqa: E731
    for e in range(weights.spec.num_experts):
        w13, w2 = weights.expert_pieces(layer, e)
        n = sum(size(p) for p in w13) + size(w2) + 6 * SCALE_ALIGNMENT
        total += -(-n // ALIGNMENT) * ALIGNMENT
    return total


def _copied_files(model_dir: str) -> list[str]:
    """Small files copied verbatim from the checkpoint (config, tokenizer, generation settings)."""
    return [n for n in sorted(os.listdir(model_dir)) if os.path.isfile(os.path.join(model_dir, n))
            and n.endswith(COPIED_SUFFIXES) and n not in SKIPPED and n != MANIFEST_NAME]


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of a finished store in ``out_dir`` (None when there is none or it is unreadable)."""
    try:
        with open(os.path.join(out_dir, MANIFEST_NAME)) as f:
            m = json.load(f)
        return m if isinstance(m, dict) and m.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def store_files(out_dir: str, manifest: dict | None, copied: list[str] = ()) -> list[str]:
    """Every file of a Klotski store in ``out_dir`` (finished or interrupted), and the temporary files of its
    writers: what a replacement removes. ``copied``: names the new conversion will copy (replaced too)."""
    from klotski.prefetch import TABLE_GLOB

    owned = {MANIFEST_NAME, NON_EXPERT_NAME, *copied}
    if manifest:
        owned.update(manifest.get("files", {}))
        owned.update(manifest.get("copied", []))
    for pattern in ("experts-layer[0-9][0-9][0-9].bin", TABLE_GLOB):
        owned.update(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out_dir), pattern)))
    out = []
    for name in os.listdir(out_dir):
        base = name.rsplit(".", 2)[0] if name.endswith(".tmp") else name  # "<name>.<unique>.tmp"
        if base in owned or (name.endswith(".tmp") and base.startswith(("experts-layer", ".klotski-probe",
                                                                           "klotski_prefetch"))):
            if os.path.isfile(os.path.join(out_dir, name)):
                out.append(name)
    return sorted(out)


def convert_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       progress: Progress | None = None, replace: bool = False, reuse: bool = False,
                       lock_timeout: float = DEFAULT_LOCK_TIMEOUT, identity: dict | None = None,
                       quantize: str | None = None, group_size: int = 128, symmetric: bool = False,
                       clip_search: bool = False) -> dict:
    """Convert ``model_dir`` (config.json + safetensors, either expert key layout) into a packed store in
    ``out_dir`` (created if needed) and return the manifest dict.

    ``out_dir`` must be empty, or hold a store of the same checkpoint (converted again, or kept as it is
    with ``reuse=True``); another checkpoint's store or a directory that is not Klotski's is refused unless
    ``replace=True``. ``identity``: the checkpoint's identity when the caller already computed it.

    ``quantize="int4"`` stores the routed experts as int4 (round-to-nearest, groups of ``group_size`` input
    columns, ``symmetric`` or with zero points, ``clip_search``: per-group range search;
    :mod:`klotski.store.quantize`). A store of the same checkpoint with other quantization settings counts
    as another store."""
    from klotski.store.quantize import int4_expert_reader

    model_dir, out_dir = os.fspath(model_dir), os.path.abspath(os.fspath(out_dir))
    if os.path.abspath(model_dir) == out_dir:
        raise ValueError(f"output directory must differ from the model directory ({model_dir})")
    spec = ModelSpec.from_pretrained(model_dir)
    index = SafetensorsIndex(model_dir)
    weights = CheckpointWeights(index, spec)  # validates names and shapes against the config
    identity = identity or checkpoint_identity(index)
    read_expert, quantization = int4_expert_reader(weights, quantize, group_size, symmetric, clip_search)
    directory = OffloadDir(out_dir)
    report = progress or (lambda what, done, total: None)
    directory.ensure_ours(replace=replace)  # before the lock file (which marks the directory as ours) exists
    with directory:
        directory.lock(exclusive=True, timeout=lock_timeout,
                       waiting=lambda: report("waiting for another writer", 0, 1))
        old = read_manifest(out_dir)
        old_identity = (old or {}).get("source", {}).get("identity")
        if old is not None and same_source(old_identity, identity) and old.get("quantization") == quantization:
            if reuse:
                return old
        elif old is not None and not replace:
            what = (f"the expert store of {describe(old_identity)}, not of {describe(identity)}"
                    if not same_source(old_identity, identity) else
                    f"this checkpoint's experts quantized as {old.get('quantization')}, not as {quantization}")
            raise IdentityMismatchError(
                f"{out_dir} holds {what}; converting over it is refused: use another directory, or replace "
                f"it (`klotski convert --replace`, or rebuild_store=True)")
        stale = store_files(out_dir, old, _copied_files(model_dir))
        _check_space(weights, model_dir, out_dir, stale)
        _remove_old_store(out_dir, stale)
        return _convert(weights, index, spec, model_dir, out_dir, identity, report, read_expert, quantization)


def _check_space(weights, model_dir: str, out_dir: str, replaced: list[str]) -> None:
    need = sum(_record_bytes(weights, layer) for layer in weights.spec.moe_layers) + _non_expert_bytes(weights)
    need += sum(os.path.getsize(os.path.join(model_dir, n)) for n in _copied_files(model_dir))
    reclaim = sum(os.path.getsize(os.path.join(out_dir, n)) for n in replaced)
    free = shutil.disk_usage(out_dir).free
    if need > free + reclaim:
        raise StoreError(f"not enough free space in {out_dir} for the expert store of {model_dir}: it needs "
                         f"{format_bytes(need)}, the filesystem has {format_bytes(free)} free"
                         + (f" (+ {format_bytes(reclaim)} of the old store it replaces)" if reclaim else ""))


def _non_expert_bytes(weights: CheckpointWeights) -> int:
    return sum(i.nbytes for i in _non_expert_infos(weights)) + 65536


def _expert_keys(weights: CheckpointWeights) -> set[str]:
    keys = set()
    for layer in weights.spec.moe_layers:
        names = expert_names(weights.spec, layer, weights.layout)
        keys.update(names)
        keys.update(scale_name(n) for n in names)  # fp8 scales travel in the expert records
    return keys


def _non_expert_infos(weights: CheckpointWeights) -> list[TensorInfo]:
    """What ``non_expert.safetensors`` holds: every checkpoint tensor but the routed experts' (verbatim); of a
    4-bit checkpoint, each quantized non-expert layer dequantized under its logical name in place of its
    codes, scales and zero points (:meth:`CheckpointWeights.use_dequantized` reads them from there)."""
    expert_keys = _expert_keys(weights)
    parts = {p for q in weights.quantized.values() for p in q.part_names()}
    infos = [weights.index[n] for n in sorted(weights.index.names()) if n not in expert_keys and n not in parts]
    return infos + [weights.info(n) for n in sorted(weights.quantized) if n not in weights.expert_keys]


def _remove_old_store(out_dir: str, stale: list[str]) -> None:
    """The manifest first (from here on the directory is not a store until we finish), then every other file
    of an earlier or interrupted store (``stale``, from :func:`store_files`)."""
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
        fsync_dir(out_dir)
    for name in stale:
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass
    fsync_dir(out_dir)


def _convert(weights, index, spec, model_dir: str, out_dir: str, identity: dict, report: Progress, read_expert,
             quantization: dict | None) -> dict:
    try:
        return _write_store(weights, index, spec, model_dir, out_dir, identity, report, read_expert, quantization)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _remove_old_store(out_dir, store_files(out_dir, None, _copied_files(model_dir)))  # nothing half-written
            raise StoreError(f"the disk holding {out_dir} filled up while converting {model_dir} "
                             f"({e.strerror}); the partial store was removed") from None
        raise


def _write_store(weights, index, spec, model_dir: str, out_dir: str, identity: dict, report: Progress, read_expert,
                 quantization: dict | None) -> dict:
    layers = spec.moe_layers
    records: list[ExpertRecord] = []
    files: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        report("experts", i, len(layers))
        recs, size = _write_layer(weights, layer, out_dir, read_expert)
        records += recs
        files[layer_file_name(layer)] = {"nbytes": size}
    report("experts", len(layers), len(layers))

    others = _non_expert_infos(weights)
    report("non-expert tensors", 0, 1)
    size, crc = _write_safetensors(index, others, os.path.join(out_dir, NON_EXPERT_NAME), weights.read_stored)
    files[NON_EXPERT_NAME] = {"nbytes": size, "checksum": crc}
    report("non-expert tensors", 1, 1)

    copied = _copied_files(model_dir)
    for name in copied:
        with _AtomicFile(os.path.join(out_dir, name)) as out:
            with open(os.path.join(model_dir, name), "rb") as src:
                shutil.copyfileobj(src, out.f)
            out.commit()
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
                   else "per-expert", "identity": identity},
        "non_expert": NON_EXPERT_NAME,
        "files": files,
        "copied": copied,
        "experts": [r.to_json(os.path.basename(r.path)) for r in records],
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest
