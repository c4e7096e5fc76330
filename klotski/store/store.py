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

from klotski.store.identity import IdentityMismatchError, describe, same_source
from klotski.store.manifest import (FORMAT, MANIFEST_NAME, NON_EXPERT_NAME, VERSION, ChecksumError, ExpertRecord,
                                    PackedTensor, StoreError, StoreIncompleteError, checksum)


class ExpertStore:
    """A finished packed store directory (raises StoreIncompleteError for an unfinished one)."""

    def __init__(self, root: str | os.PathLike, expect_identity: dict | None = None):
        """``expect_identity``: the identity of the checkpoint this store must come from
        (:func:`klotski.store.identity.checkpoint_identity`); another one raises IdentityMismatchError."""
        self.root = os.fspath(root)
        self.directory = None  # the OffloadDir whose shared lock this store holds (see open_store)
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
        if expect_identity is not None and not same_source(self.identity, expect_identity):
            raise IdentityMismatchError(
                f"expert store {self.root} was converted from {describe(self.identity)}, not from the checkpoint "
                f"in use, {describe(expect_identity)}: its experts would give wrong tokens. Use another "
                f"offload_dir, or rebuild it (LLM(..., rebuild_store=True) or `klotski convert --replace`)")
        for name, meta in self.manifest.get("files", {}).items():
            fpath = os.path.join(self.root, name)
            if not os.path.isfile(fpath):
                raise StoreError(f"{self.root}: file {name} listed in the manifest is missing")
            size = os.path.getsize(fpath)
            if size != meta["nbytes"]:
                raise StoreError(f"{fpath}: expected {meta['nbytes']} bytes (manifest), found {size} (truncated "
                                 f"or replaced)")
        self._records: dict[tuple[int, int], ExpertRecord] = {}
        for d in self.manifest.get("experts", []):
            try:
                rec = ExpertRecord.from_json(self.root, d, self.fp8_block, self.int4)
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, StoreError):
                    raise
                raise StoreError(f"{path}: malformed expert record {str(d)[:120]} ({type(e).__name__}: {e})") from None
            self._records[(rec.layer, rec.expert)] = rec

    @property
    def identity(self) -> dict | None:
        """The source checkpoint's identity recorded at conversion (None: an older store without one)."""
        return self.manifest.get("source", {}).get("identity")

    def close(self) -> None:
        """Release the offload directory's shared lock (see :func:`open_store`)."""
        if self.directory is not None:
            self.directory.unlock()
            self.directory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        if layers is None:
            self.verify_non_expert()
        return n

    def verify_non_expert(self) -> None:
        """Check ``non_expert.safetensors`` against the checksum recorded at conversion (when recorded)."""
        import zlib

        want = self.manifest.get("files", {}).get(os.path.basename(self.non_expert_path), {}).get("checksum")
        if not want:
            return
        crc = 0
        with open(self.non_expert_path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        got = f"crc32:{crc & 0xFFFFFFFF:08x}"
        if got != want:
            raise ChecksumError(f"checksum mismatch for {self.non_expert_path}: expected {want}, got {got}")


def open_store(index, offload_dir, rebuild: bool = False, lock_timeout: float | None = None, progress=None,
               quantize: str | None = None, **quantize_options) -> ExpertStore:
    """The packed store of the checkpoint behind ``index`` (a :class:`~klotski.checkpoint.SafetensorsIndex`;
    its identity is ``index.identity()``) in ``offload_dir``, converted when missing or unfinished; another checkpoint's store is refused (IdentityMismatchError naming both)
    or, with ``rebuild=True``, replaced. The returned store holds the directory's shared lock until
    ``close()``, so no other process replaces it while it is read; a finished store on a read-only
    directory is read without one."""
    from klotski.store.convert import convert_checkpoint
    from klotski.store.directory import DEFAULT_LOCK_TIMEOUT, OffloadDir

    timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    model_dir, identity = index.model_dir, index.identity()
    directory = OffloadDir(offload_dir)
    for attempt in range(2):
        directory.lock(exclusive=False, timeout=timeout)
        try:
            store = ExpertStore(directory.path, expect_identity=identity)
            _check_quantization(store, quantize)
            store.directory = directory
            return store
        except StoreIncompleteError:
            pass
        except IdentityMismatchError:
            if not rebuild or attempt:
                directory.unlock()
                raise
        except BaseException:
            directory.unlock()
            raise
        directory.unlock()  # a writer needs the exclusive lock: convert (waits for other readers / writers)
        if attempt == 0:
            convert_checkpoint(model_dir, directory.path, progress=progress, replace=rebuild, reuse=True,
                               lock_timeout=timeout, identity=identity, quantize=quantize, **quantize_options)
    raise StoreError(f"{offload_dir}: the store converted from {model_dir} could not be opened")


def _check_quantization(store: ExpertStore, quantize: str | None) -> None:
    held = "int4" if store.int4 is not None else None
    if held == quantize:
        return
    if held == "int4":
        what = "int4 experts: pass quantization='int4' to use it"
    else:
        what = f"{store.manifest.get('dtype')} experts, not int4 as asked (quantization={quantize!r})"
    raise IdentityMismatchError(
        f"expert store {store.root} holds {what}; or use another offload_dir, or rebuild it (rebuild_store=True, "
        f"or `klotski convert --replace{' --quantize int4' if quantize == 'int4' else ''}`)")


__all__ = ["ExpertStore", "PackedTensor", "open_store"]
