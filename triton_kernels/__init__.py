"""Fused Triton MoE expert kernels, installed as ``klotski.triton_kernels``.

``fused_moe`` / ``fused_moe_torch``: grouped-expert MoE over a slot-addressed weight pool, accumulating into a
given output. ``moe_align_block_size`` / ``moe_align_block_size_torch``: token-expert pairs grouped by expert
and padded to the GEMM block (vLLM semantics). Triton itself is imported only when a kernel runs.
"""
from .fused_moe import CHUNK_TOKENS, fused_moe, fused_moe_torch, invoke_fused_moe, workspace_bytes
from .moe_align import moe_align_block_size, moe_align_block_size_torch

__all__ = [
    "CHUNK_TOKENS",
    "fused_moe",
    "fused_moe_torch",
    "invoke_fused_moe",
    "moe_align_block_size",
    "moe_align_block_size_torch",
    "workspace_bytes",
]
