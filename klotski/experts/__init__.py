"""Offloaded routed experts for other engines: one ``torch.nn.Module`` per MoE layer.

- :class:`OffloadedExperts` (``module``): ``forward(hidden_states [T, H], topk_ids [T, k], topk_weights [T, k])
  -> [T, H]`` over a device slot pool, a host tier and a disk tier, loading only routed experts.
- :class:`ExpertOffloadGroup` (``group``): what a model's layers share (budgets, loader thread, disk reader
  and staging ring, correlation prefetcher).
- :class:`CheckpointExperts` / :class:`StoreExperts` (``source``): per-expert reads from an HF checkpoint or
  from the packed expert store.

``klotski.integrations.transformers`` puts these modules into Hugging Face transformers models.
"""
from klotski.experts.group import ExpertOffloadGroup
from klotski.experts.module import OffloadedExperts, experts_source
from klotski.experts.source import CheckpointExperts, ExpertShape, StoreExperts

__all__ = ["CheckpointExperts", "ExpertOffloadGroup", "ExpertShape", "OffloadedExperts", "StoreExperts",
           "experts_source"]
