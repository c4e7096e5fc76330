"""Read side of the packed expert store: (layer, expert) -> where its bytes are, reads, checksum checks.

    store = ExpertStore(out_dir)
    rec = store.expert(layer, e)               # rec.path, rec.offset (4096-aligned), rec.nbytes
    ring = PinnedRing(4, store.max_record_bytes)
    slot = ring.acquire()
    reader.read(rec.path, rec.offset, rec.nbytes, into=slot).wait()   # one O_DIRECT request
    w13, w2 = store.views(rec, slot)           # [2I, H], [H, I] tensors over the slot (no copy)
"""
from __future__ import annotations

import json
import os

import torch

from klotski.store.manifest import (FORMAT, MANIFEST_NAME, NON_EXPERT_NAME, VERSION, ChecksumError, ExpertRecord,
                                    PackedTensor, StoreError, StoreIncompleteError, checksum)


class ExpertStore:
    """A finished packed store directory (raises StoreIncompleteError for an unfinished one)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        path = os.path.join(self.root, MANIFEST_NAME)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"expert store directory not found: {self.root}")
        if not os.path.isfile(path):
            leftovers = sorted(n for n in os.listdir(self.root) if n.endswith(".tmp"))
            hint = f" (leftover temporary files: {', '.join(leftovers[:3])}...)" if leftovers else ""
            raise StoreIncompleteError(
                f"{self.root} is not a finished expert store: {MANIFEST_NAME} is missing{hint}; the conversion "
                f"never ran or was interrupted - run `klotski convert MODEL_DIR {self.root}` again")
        try:
            with open(path) as f:
                self.manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise StoreError(f"{path}: expected format {FORMAT!r} version {VERSION}, got "
                             f"{self.manifest.get('format')!r} version {self.manifest.get('version')!r}")
        for name, meta in self.manifest["files"].items():
            fpath = os.path.join(self.root, name)
            if not os.path.isfile(fpath):
                raise StoreError(f"{self.root}: file {name} listed in the manifest is missing")
            size = os.path.getsize(fpath)
            if size != meta["nbytes"]:
                raise StoreError(f"{fpath}: expected {meta['nbytes']} bytes (manifest), found {size} (truncated "
                                 f"or replaced)")
        self._records: dict[tuple[int, int], ExpertRecord] = {}
        for d in self.manifest["experts"]:
            rec = ExpertRecord.from_json(self.root, d, self.fp8_block, self.int4)
            self._records[(rec.layer, rec.expert)] = rec

    # ---- lookup -------------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return list(self.manifest["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.manifest["num_experts"])

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The weight block of an fp8 store (records hold fp8 weights + block scales), else None."""
        block = self.manifest.get("fp8_block")
        return tuple(int(b) for b in block) if block else None

    @property
    def int4(self) -> dict | None:
        """An int4 store's ``quantization`` entry (method, bits, group_size, symmetric, scale_dtype), else None."""
        q = self.manifest.get("quantization")
        if not q:
            return None
        if q.get("method") != "int4" or int(q.get("bits", 0)) != 4:
            raise StoreError(f"{self.root}: unsupported expert quantization {q!r} in the manifest; "
                             f"supported: method 'int4', bits 4")
        return q

    @property
    def non_expert_path(self) -> str:
        """The safetensors file with every non-expert tensor under its original name."""
        return os.path.join(self.root, self.manifest.get("non_expert", NON_EXPERT_NAME))

    @property
    def max_record_bytes(self) -> int:
        """The largest expert record: a ring slot of this size holds any expert."""
        return max(r.nbytes for r in self._records.values())

    def expert(self, layer: int, expert: int) -> ExpertRecord:
        try:
            return self._records[(int(layer), int(expert))]
        except KeyError:
            raise KeyError(f"no expert {expert} of layer {layer} in store {self.root} (MoE layers "
                           f"{self.moe_layers}, {self.num_experts} experts)") from None

    def records(self) -> list[ExpertRecord]:
        return list(self._records.values())

    # ---- reading ------------------------------------------------------------------------------------
    @staticmethod
    def views(rec: ExpertRecord, slot, view_offset: int = 0):
        """(w13 [2I, H], w2 [H, I]) as views of a :class:`klotski.io.Slot` the record was read into
        (:class:`~klotski.model.quant.Fp8Weight` views of fp8 + scales for an fp8 store)."""
        return rec.views(slot.tensor(torch.uint8, (rec.nbytes,), view_offset))

    def read_expert(self, layer: int, expert: int, reader=None, verify: bool = False,
                    timeout: float | None = 60.0):
        """(w13, w2) of one expert as new CPU tensors (fp8 stores: :class:`~klotski.model.quant.Fp8Weight`,
        as stored), read with one request through ``reader`` (a :class:`klotski.io.DiskReader`; a temporary
        one if None)."""
        from klotski import _C
        from klotski.io import DiskReader

        rec = self.expert(layer, expert)
        own = reader is None
        reader = DiskReader() if own else reader
        try:
            buf = _C.AlignedHostBuffer(max(1, _C.span_bytes(rec.offset, rec.nbytes)))
            t = reader.read(rec.path, rec.offset, rec.nbytes, into=buf).wait(timeout)
        finally:
            if own:
                reader.close()
        raw = torch.frombuffer(buf, dtype=torch.uint8)[t.view_offset:t.view_offset + rec.nbytes]
        if verify:
            self.verify_record(rec, raw)
        return rec.views(raw.clone())

    # ---- integrity ----------------------------------------------------------------------------------
    @staticmethod
    def verify_record(rec: ExpertRecord, record_bytes) -> None:
        """Check w13 and w2 of one record's bytes (uint8 tensor / buffer of ``rec.nbytes``)."""
        raw = record_bytes if isinstance(record_bytes, torch.Tensor) else torch.frombuffer(record_bytes, dtype=torch.uint8)
        for t in rec.tensors:
            got = checksum(raw[t.offset:t.offset + t.nbytes])
            if got != t.checksum:
                raise ChecksumError(f"checksum mismatch for {t.name} ({os.path.basename(rec.path)} at offset "
                                    f"{rec.offset + t.offset}, {t.nbytes} bytes): expected {t.checksum}, got {got}")

    def verify(self, reader=None, layers: list[int] | None = None) -> int:
        """Re-read every expert (of ``layers``) and check its checksums; raises ChecksumError naming the first
        bad tensor. Returns the number of experts checked."""
        from klotski import _C
        from klotski.io import DiskReader

        own = reader is None
        reader = DiskReader() if own else reader
        wanted = None if layers is None else {int(l) for l in layers}
        n = 0
        try:
            for rec in self._records.values():
                if wanted is not None and rec.layer not in wanted:
                    continue
                buf = _C.AlignedHostBuffer(max(1, _C.span_bytes(rec.offset, rec.nbytes)))
                t = reader.read(rec.path, rec.offset, rec.nbytes, into=buf).wait(60.0)
                raw = torch.frombuffer(buf, dtype=torch.uint8)[t.view_offset:t.view_offset + rec.nbytes]
                self.verify_record(rec, raw)
                n += 1
        finally:
            if own:
                reader.close()
        return n


__all__ = ["ExpertStore", "PackedTensor"]
