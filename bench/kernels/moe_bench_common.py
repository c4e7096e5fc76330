"""Shared pieces of the kernel benchmark and tuner: model shapes, random MoE inputs, timing, device naming.

Scripts in this folder import it as a sibling module; the package never imports benchmarks.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int  # H
    inter: int  # I
    num_experts: int  # E
    top_k: int  # k

    def small(self) -> "MoEShape":
        """A CPU-sized stand-in: H and I divided by 16 (E and k kept, so the routing pattern is the same)."""
        return MoEShape(self.name + "/16", max(16, self.hidden // 16), max(16, self.inter // 16),
                        self.num_experts, self.top_k)


MODELS = {
    "mixtral-8x7b": MoEShape("Mixtral-8x7B", 4096, 14336, 8, 2),
    "qwen3-30b-a3b": MoEShape("Qwen3-30B-A3B", 2048, 768, 128, 8),
    "deepseek-v2-lite": MoEShape("DeepSeek-V2-Lite", 2048, 1408, 64, 6),
}
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SMALL_M = [1, 16, 128]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def setup_interpreter(args) -> None:
    """``--interpret`` runs the Triton kernels under the CPU interpreter: set before Triton wraps any kernel."""
    if getattr(args, "interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"


def make_weights(shape: MoEShape, dtype: torch.dtype, device: str, seed: int = 0):
    """w13 [E, 2I, H], w2 [E, H, I], scaled so activations stay O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(shape.num_experts, 2 * shape.inter, shape.hidden, generator=g, device=device, dtype=dtype)
    w13.mul_(shape.hidden ** -0.5)
    w2 = torch.randn(shape.num_experts, shape.hidden, shape.inter, generator=g, device=device, dtype=dtype)
    w2.mul_(shape.inter ** -0.5)
    return w13, w2


def make_tokens(shape: MoEShape, num_tokens: int, dtype: torch.dtype, device: str, seed: int = 1):
    """hidden_states [M, H], topk_weights [M, k] fp32, topk_ids [M, k] int64 from softmax over random logits."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, shape.hidden, generator=g, device=device, dtype=dtype)
    logits = torch.randn(num_tokens, shape.num_experts, generator=g, device=device)
    topk_weights, topk_ids = torch.topk(logits.softmax(-1), shape.top_k, dim=-1)
    return x, topk_weights, topk_ids


def time_ms(fn, device: str, warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"
