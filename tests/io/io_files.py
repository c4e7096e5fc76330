"""Shared by the reader tests: files of random bytes and Python's own reads of them (the reference)."""
import numpy as np


def write_random_files(root, sizes, seed: int, prefix: str) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i, size in enumerate(sizes):
        p = root / f"{prefix}{i}.bin"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        out.append(str(p))
    return out


def python_read(path, offset, nbytes):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)
