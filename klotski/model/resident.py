"""The resident executor: every weight in memory on one device; the reference every policy must match."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klotski.model.decoder import attention_step, make_rotary, mlp_step
from klotski.model.expert_selection import ExpertSelection, SelectionStats, is_decode_step, route_selected
from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.moe import ExpertsFn
from klotski.model.spec import ModelSpec
from klotski.model.weights import KEEP_FP32, CheckpointWeights
from klotski.triton_kernels.fused_moe import fused_moe, fused_moe_torch


def default_experts_fn(device: torch.device) -> ExpertsFn:
    """The Triton kernels on CUDA; the torch reference on CPU (the Triton interpreter is for tests only)."""
    return fused_moe if device.type == "cuda" else fused_moe_torch


class ResidentModel:
    """Loads a validated checkpoint onto ``device`` in ``dtype`` and runs forward passes over a KV cache."""

    def __init__(
        self,
        weights: CheckpointWeights,
        device: torch.device,
        dtype: torch.dtype,
        experts_fn: ExpertsFn | None = None,
        expert_selection=None,
    ):
        self.spec: ModelSpec = weights.spec
        # decode steps: batch-aware expert selection over the whole batch (klotski.model.expert_selection);
        # every expert is resident here, so "lynx-offload" finds nothing worth dropping and changes nothing
        self.selection = ExpertSelection.parse(expert_selection)
        self.selection_stats = SelectionStats()
        self.device = device
        self.dtype = dtype
        self.experts_fn = experts_fn or default_experts_fn(device)
        to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        g = weights.read_global()
        self.embed = to(g["embed"])
        self.norm = to(g["norm"])
        self.lm_head = to(g["lm_head"]) if "lm_head" in g else self.embed
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(self.spec.num_layers):
            w = {k: v.to(device=device, dtype=torch.float32) if k in KEEP_FP32 else to(v)
                 for k, v in weights.read_layer(i, dtype).items()}  # fp8 weights: dequantized into dtype
            if self.spec.is_moe(i):
                w13, w2 = weights.read_experts(i, dtype)
                w["w13"], w["w2"] = to(w13), to(w2)
            self.layers.append(w)
        self.rotary = make_rotary(self.spec, device)

    def _selected_route(self, layer: int, w: dict, h: torch.Tensor, free: torch.Tensor):
        out = route_selected(self.spec, w, h, self.selection, free)
        self.selection_stats.record(layer, out.exact_ids, out.topk_ids, out.remapped)
        return out.topk_weights, out.topk_ids

    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor) -> KVCache:
        return KVCache(self.spec.num_layers, batch_size, capacity, pad.to(self.device))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids [B, S] (left-padded per ``cache.pad``) -> fp32 logits [B, S, V] or [B, V] (last column)."""
        B, S = input_ids.shape
        input_ids = input_ids.to(self.device)
        mask = cache.key_mask(S, self.device)
        positions = cache.positions(S, self.device)
        valid = cache.query_valid(S, self.device)
        x = F.embedding(input_ids, self.embed)
        select = self.selection.measured and is_decode_step(S, cache.length)
        if select:
            self.selection_stats.begin_step(object())
        all_free = torch.ones(self.spec.num_experts, dtype=torch.bool, device=self.device)
        for i, w in enumerate(self.layers):
            x = attention_step(self.spec, w, x, cache, i, self.rotary, mask, positions)
            router = (lambda w_, h_, i=i: self._selected_route(i, w_, h_, all_free)) if select else None
            x = mlp_step(self.spec, w, x, i, valid, self.experts_fn, router)
        cache.length += S
        if not all_logits:
            x = x[:, -1:]
        logits = F.linear(rms_norm(x, self.norm, self.spec.rms_norm_eps), self.lm_head).float()
        return logits if all_logits else logits[:, 0]
