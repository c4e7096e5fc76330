"""Klotski: offloaded Mixture-of-Experts inference on one GPU.

Public surface: ``from klotski import LLM, SamplingParams``; for other engines
``klotski.OffloadedExperts`` / ``klotski.ExpertOffloadGroup`` (see :mod:`klotski.experts`).
"""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "OffloadedExperts", "ExpertOffloadGroup", "__version__"]


def __getattr__(name):  # lazy: importing klotski must not import torch-heavy modules eagerly
    if name == "LLM":
        from klotski.engine import LLM

        return LLM
    if name == "SamplingParams":
        from klotski.sampling import SamplingParams

        return SamplingParams
    if name in ("OffloadedExperts", "ExpertOffloadGroup"):
        import klotski.experts

        return getattr(klotski.experts, name)
    raise AttributeError(f"module 'klotski' has no attribute {name!r}")
