"""Klotski: offloaded Mixture-of-Experts inference on one GPU.

Public surface: ``from klotski import LLM, SamplingParams``.
"""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):  # lazy: importing klotski must not import torch-heavy modules eagerly
    if name == "LLM":
        from klotski.engine import LLM

        return LLM
    if name == "SamplingParams":
        from klotski.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'klotski' has no attribute {name!r}")
