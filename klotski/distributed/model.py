"""A data-parallel rank of an FSE-DP run: its own prompts, KV cache and attention; routed experts streamed.

Everything that is not a routed expert (embeddings, attention, norms, routers, shared experts, dense MLPs, the
LM head) is resident on every rank in this first version and runs through the single-device layer code
(:func:`klotski.model.decoder.attention_step` / :func:`~klotski.model.decoder.mlp_step`). The routed experts of
each MoE layer run through :class:`~klotski.distributed.streaming.ExpertStreamer`: sliced, loaded from host
once across the ranks and forwarded along the ranks whose tokens need them.

Ranks run different numbers of forwards (different prompts, lengths, stops), but the MoE layers are collective.
So every forward starts with an all-reduce of "this rank has a forward to run", and a rank that has finished
its work calls :meth:`DistributedModel.drain`: it joins the other ranks' forwards with no tokens (one all-gather
of zero counts per MoE layer) until every rank has drained.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from klotski.distributed.slices import HostSlices
from klotski.distributed.streaming import ExpertStreamer
from klotski.model.decoder import attention_step, make_rotary, mlp_step
from klotski.model.kv_cache import KVCache
from klotski.model.layers import rms_norm
from klotski.model.moe import expert_activation
from klotski.model.resident import default_experts_fn
from klotski.model.weights import KEEP_FP32, CheckpointWeights


class DistributedModel:
    """One rank's executor (``new_cache`` / ``forward``, as :class:`~klotski.model.resident.ResidentModel`).

    ``num_slices``: slices per expert (along the intermediate dimension); ``slots``: slice buffers per rank
    (>= 1; 2 lets a rank receive one slice while it computes another). ``routing_hook(topk_weights, topk_ids)
    -> (topk_weights, topk_ids)``: applied to every MoE layer's routing before the experts run (tests force
    skewed or empty routings with it). ``loader``: which rank loads each slice from host
    (:func:`klotski.distributed.schedule.plan_layer`). ``group``: the process group (default: the world).
    """

    def __init__(self, weights: CheckpointWeights, device: torch.device, dtype: torch.dtype, num_slices: int = 2,
                 slots: int = 2, experts_fn=None, routing_hook=None, group=None, loader: str = "balanced"):
        if not dist.is_initialized():
            raise RuntimeError("DistributedModel needs torch.distributed initialised (run under torchrun, or call "
                               "torch.distributed.init_process_group first)")
        self.spec = weights.spec
        if not any(self.spec.is_moe(i) for i in range(self.spec.num_layers)):
            raise ValueError("the model has no MoE layer: there is nothing to stream across ranks")
        self.device, self.dtype, self.group = device, dtype, group
        self.routing_hook = routing_hook
        to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        g = weights.read_global()
        self.embed = to(g["embed"])
        self.norm = to(g["norm"])
        self.lm_head = to(g["lm_head"]) if "lm_head" in g else self.embed
        self.layers: list[dict] = []
        for i in range(self.spec.num_layers):
            w = {k: v.to(device=device, dtype=torch.float32) if k in KEEP_FP32 else to(v)
                 for k, v in weights.read_layer(i, dtype).items()}
            if self.spec.is_moe(i):
                w["w13"] = w["w2"] = None  # routed experts stream through self.streamer, never resident
            self.layers.append(w)
        self.rotary = make_rotary(self.spec, device)
        host = HostSlices(weights, dtype, num_slices, pin=device.type == "cuda")
        self.streamer = ExpertStreamer(host, slots, device, experts_fn or default_experts_fn(device),
                                       expert_activation(self.spec), group, loader)
        self.forwards = 0  # forwards run by this rank (idle ones included)

    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor) -> KVCache:
        return KVCache(self.spec.num_layers, batch_size, capacity, pad.to(self.device))

    def _others_active(self, active: bool) -> int:
        """All-reduce of the ranks with a forward to run now (this one included when ``active``)."""
        flag = torch.tensor([1 if active else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, group=self.group)
        self.forwards += 1
        return int(flag.item())

    def _experts(self, layer: int):
        def run(h, w13, w2, topk_weights, topk_ids, activation="silu"):
            if self.routing_hook is not None:
                topk_weights, topk_ids = self.routing_hook(topk_weights, topk_ids)
            return self.streamer.run_layer(layer, h, topk_weights, topk_ids).to(h.dtype)

        return run

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids [B, S] (left-padded per ``cache.pad``) -> fp32 logits [B, S, V] or [B, V] (last column).
        Collective: the other ranks run a forward of their own, or :meth:`drain`, at the same time."""
        self._others_active(True)
        B, S = input_ids.shape
        input_ids = input_ids.to(self.device)
        mask = cache.key_mask(S, self.device)
        positions = cache.positions(S, self.device)
        valid = cache.query_valid(S, self.device)
        x = F.embedding(input_ids, self.embed)
        for i, w in enumerate(self.layers):
            x = attention_step(self.spec, w, x, cache, i, self.rotary, mask, positions)
            x = mlp_step(self.spec, w, x, i, valid, self._experts(i))
        cache.length += S
        if not all_logits:
            x = x[:, -1:]
        logits = F.linear(rms_norm(x, self.norm, self.spec.rms_norm_eps), self.lm_head).float()
        return logits if all_logits else logits[:, 0]

    @torch.inference_mode()
    def drain(self) -> int:
        """Join the other ranks' forwards with no tokens until every rank has called ``drain``; returns the
        idle forwards joined."""
        idle = 0
        H, k = self.spec.hidden_size, self.spec.top_k
        h = torch.zeros(0, H, dtype=self.dtype, device=self.device)
        weights = torch.zeros(0, k, dtype=torch.float32, device=self.device)
        ids = torch.zeros(0, k, dtype=torch.int64, device=self.device)
        while self._others_active(False):
            for i in range(self.spec.num_layers):
                if self.spec.is_moe(i):
                    self.streamer.run_layer(i, h, weights, ids)
            idle += 1
        return idle

    def metrics(self) -> dict:
        return {**self.streamer.metrics(), "forwards": self.forwards}
