"""Fused Triton MoE expert kernels, installed as ``klotski.triton_kernels``."""
