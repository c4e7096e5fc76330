import os
import sys

import importlib

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # moe_testing.py


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run this test's kernels under the Triton CPU interpreter (set only for this test)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float buffer fused_moe allocates (output, intermediate caches) starts as NaN, so an element that a
    kernel forgets to write, or reads before it is written, shows up in the result."""
    import moe_testing
    fused_moe_module = importlib.import_module("klotski.triton_kernels.fused_moe")

    monkeypatch.setattr(fused_moe_module, "torch", moe_testing.PoisonedTorch())
