"""Packed expert store: a checkpoint rewritten so one O_DIRECT read lands one expert.

``convert_checkpoint(model_dir, out_dir)`` (CLI: ``klotski convert MODEL_DIR OUT_DIR``) writes, per MoE layer,
``experts-layerLLL.bin`` with every expert's ``w13`` [2I, H] (gate rows, then up rows) immediately followed
by its ``w2`` [H, I] (fp8 checkpoints: the fp8 bytes as stored, then the w13 and w2 block scales, fp32,
16-byte aligned), each expert record starting on a 4096-byte boundary; the non-expert tensors go to
``non_expert.safetensors`` under their original names; ``config.json`` and tokenizer files are copied; and
``manifest.json`` (layer, expert, offset, nbytes, dtype, shape, checksum per tensor, and the source
checkpoint's identity) is written last.

``convert_checkpoint(..., quantize="int4", group_size=128, symmetric=False)`` (CLI ``--quantize int4``) stores
the routed experts as int4 codes + group scales (+ zero points) instead (:mod:`klotski.store.quantize`; the
manifest's ``quantization`` entry records bits, group size and symmetry).

``ExpertStore(out_dir)`` answers (layer, expert) -> :class:`ExpertRecord` (path, offset, nbytes and the
w13/w2 placement inside the record), reads experts through a :class:`klotski.io.DiskReader`, and verifies
checksums (:class:`ChecksumError` names the tensor). ``open_store(index, offload_dir)`` opens the
store of that checkpoint, converting it first when missing, and refuses another checkpoint's store
(:class:`IdentityMismatchError`); :class:`OffloadDir` holds the rules for writing into and locking a directory.
"""
from klotski.store.convert import convert_checkpoint
from klotski.store.directory import DirectoryBusyError, OffloadDir
from klotski.store.identity import IdentityMismatchError, checkpoint_identity
from klotski.store.manifest import (
    MANIFEST_NAME,
    ChecksumError,
    ExpertRecord,
    PackedTensor,
    StoreError,
    StoreIncompleteError,
    checksum,
)
from klotski.store.store import ExpertStore, open_store

__all__ = [
    "MANIFEST_NAME",
    "DirectoryBusyError",
    "IdentityMismatchError",
    "OffloadDir",
    "checkpoint_identity",
    "open_store",
    "ChecksumError",
    "ExpertRecord",
    "ExpertStore",
    "PackedTensor",
    "StoreError",
    "StoreIncompleteError",
    "checksum",
    "convert_checkpoint",
]
