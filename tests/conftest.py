import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_models.py


class CheckpointFactory:
    """Session cache of tiny transformers checkpoints: ``get(arch, dtype=..., fused=..., sharded=...)``."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def get(self, arch, dtype="float32", fused=False, sharded=False, **overrides):
        import torch

        import hf_models

        key = (arch, dtype, fused, sharded, tuple(sorted(overrides.items())))
        if key not in self.cache:
            path = os.path.join(self.root, "-".join(str(k) for k in key[:4]) + f"-{len(self.cache)}")
            model = hf_models.build(arch, path, dtype=getattr(torch, dtype), fused=fused,
                                    shard_bytes=60_000 if sharded else None, **overrides)
            self.cache[key] = (path, model)
        return self.cache[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return CheckpointFactory(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="session")
def fp8_checkpoints(tmp_path_factory, checkpoints):
    """fp8 block-scaled tiny checkpoints and their dequantized twins (tests/fp8_models.py)."""
    import fp8_models

    return fp8_models.Fp8Factory(str(tmp_path_factory.mktemp("fp8")), checkpoints)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Profiles, demo models and other caches go to a temporary XDG cache, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache-all")))
    yield
    mp.undo()


@pytest.fixture
def klotski_own_order(monkeypatch):
    """The planner searches klotski's own variants only, not also FlexGen's order at flexgen's best point (which
    it takes wherever that is predicted faster, as it often is for the tests' tiny models): for tests of the
    klotski pipeline itself under small budgets."""
    from klotski.planner import Planner

    monkeypatch.setattr(Planner, "seed_variants", lambda self, policy, overlap: [])
