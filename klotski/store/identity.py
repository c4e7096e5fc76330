"""Whose bytes are these: a checkpoint's identity, recorded in every file Klotski derives from it.

A packed store, a prefetch table or any other side file written for one checkpoint must never be used with
another: two checkpoints of one architecture have the same shapes and tensor names, so nothing but the
recorded identity tells them apart, and the wrong one gives plausible but wrong tokens.

``checkpoint_identity(index)`` is computed from headers and a small sample of every tensor's bytes (the
first, middle and last :data:`SAMPLE_BYTES` of each tensor, fewer reads for small ones), so it costs a few
kilobytes of reads per tensor, not a pass over the checkpoint:

* ``config_sha256``: ``config.json``, parsed and re-serialised with sorted keys (formatting does not count);
* ``tensors_sha256``: every tensor's name, dtype and shape;
* ``content_sha256``: the sampled bytes of every tensor, in name order;
* ``fingerprint``: one digest over the three, what stores and side files compare.

Two checkpoints that differ only in weights outside the sampled blocks get the same fingerprint; the packed
store also records a crc32 of every expert tensor it holds, so ``ExpertStore.verify()`` and a re-conversion
detect that case at the cost of a full read.
"""
from __future__ import annotations

import hashlib
import json
import os

from klotski.checkpoint import SafetensorsIndex

SAMPLE_BYTES = 4096


class IdentityMismatchError(ValueError):
    """A store or side file belongs to another checkpoint (or to conversion options other than those asked)."""


def _config_digest(model_dir: str) -> str:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config.json not found in {model_dir}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sample_spans(offset: int, nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the first, middle and last SAMPLE_BYTES of a tensor (its whole bytes if small)."""
    if nbytes <= 3 * SAMPLE_BYTES:
        return [(offset, nbytes)] if nbytes else []
    mid = offset + (nbytes - SAMPLE_BYTES) // 2
    return [(offset, SAMPLE_BYTES), (mid, SAMPLE_BYTES), (offset + nbytes - SAMPLE_BYTES, SAMPLE_BYTES)]


def checkpoint_identity(index: SafetensorsIndex) -> dict:
    """The identity of the checkpoint behind ``index`` (see the module docstring for what it covers)."""
    tensors = hashlib.sha256()
    content = hashlib.sha256()
    fds: dict[str, int] = {}
    try:
        for name in sorted(index.names()):
            info = index[name]
            tensors.update(f"{name}\0{info.dtype}\0{list(info.shape)}\n".encode())
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            content.update(name.encode() + b"\0")
            for off, n in _sample_spans(info.offset, info.nbytes):
                data = os.pread(fd, n, off)
                if len(data) != n:
                    raise ValueError(f"{info.path}: short read of tensor {name!r} at offset {off} "
                                     f"({len(data)} of {n} bytes): the file is truncated")
                content.update(data)
    finally:
        for fd in fds.values():
            os.close(fd)
    parts = {"config_sha256": _config_digest(index.model_dir), "tensors_sha256": tensors.hexdigest(),
             "content_sha256": content.hexdigest()}
    fingerprint = hashlib.sha256("|".join(parts[k] for k in sorted(parts)).encode()).hexdigest()
    return {"fingerprint": fingerprint, **parts, "num_tensors": len(index.names()),
            "model_dir": os.path.abspath(index.model_dir)}


def describe(identity: dict | None) -> str:
    """One line naming a checkpoint identity for error messages."""
    if not identity:
        return "no recorded identity (written by an older Klotski)"
    return f"{identity.get('model_dir', '?')} (fingerprint {str(identity.get('fingerprint', '?'))[:16]})"


def same_source(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and a.get("fingerprint") == b.get("fingerprint")


__all__ = ["IdentityMismatchError", "SAMPLE_BYTES", "checkpoint_identity", "describe", "same_source"]
