"""Weight-only quantized expert formats.

:mod:`klotski.quant.int4`: the int4 slot layout (codes packed along K, group-wise scales, optional zero points)
that ``klotski.triton_kernels.fused_moe`` computes from, with pack / unpack / dequantize and round-to-nearest
quantization. :mod:`klotski.quant.checkpoint_formats`: pre-quantized checkpoints (GPTQ, AWQ,
compressed-tensors) converted into that layout; :mod:`klotski.quant.linears`: finding such a checkpoint's quantized
linear layers by name and reading them. The fp8 block-scaled format of DeepSeek-V3 checkpoints lives in
:mod:`klotski.model.quant`.
"""
from klotski.quant.int4 import (Int4Weight, dequantize_int4, int4_nbytes, pack_int4, quantize_int4,
                                unpack_int4)

__all__ = ["Int4Weight", "dequantize_int4", "int4_nbytes", "pack_int4", "quantize_int4", "unpack_int4"]
