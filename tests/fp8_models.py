"""fp8 block-scaled copies of tiny checkpoints (DeepSeek-V3's format), and their exact dequantized twins.

``quantize(src, fp8_dir, deq_dir, block)`` rewrites every 2-D linear weight of ``src`` (and fused 3-D expert
tensors) except the embeddings, LM head and router as ``float8_e4m3fn`` with a per-block fp32
``<name>_scale_inv`` (scale = block amax / 448, the e4m3 maximum), writes ``quantization_config`` into
config.json, and writes ``deq_dir``: the same checkpoint with those weights replaced by their dequantized
values in fp32 (``fp32(q) * scale``, exact in fp32), every other tensor unchanged. Written here with plain
torch so the test does not share code with :func:`klotski.model.quant.dequantize_fp8_block`.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0


def is_quantized(name: str, t: torch.Tensor) -> bool:
    if not t.is_floating_point() or "embed_tokens" in name or name.startswith("lm_head"):
        return False
    if name.endswith(".gate.weight"):  # router
        return False
    return (t.dim() == 2 and name.endswith(".weight")) or (t.dim() == 3 and name.endswith(("gate_up_proj", "down_proj")))


def block_scales(w: torch.Tensor, block) -> torch.Tensor:
    """[R, C] -> per-block amax / 448, [ceil(R/b0), ceil(C/b1)] fp32 (padding with zeros for edge blocks)."""
    b0, b1 = block
    R, C = w.shape
    nr, nc = math.ceil(R / b0), math.ceil(C / b1)
    padded = torch.zeros(nr * b0, nc * b1)
    padded[:R, :C] = w.float().abs()
    amax = padded.view(nr, b0, nc, b1).amax(dim=(1, 3))
    return (amax / E4M3_MAX).clamp_min(1e-8)


def expand(scale: torch.Tensor, block, shape) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def quantize_matrix(w: torch.Tensor, block):
    """-> (fp8 [R, C], scale_inv fp32, dequantized fp32)."""
    scale = block_scales(w, block)
    full = expand(scale, block, w.shape)
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def quantize(src: str, fp8_dir: str, deq_dir: str, block=(128, 128)) -> list[str]:
    """Write the fp8 and dequantized checkpoints of ``src``; returns the names of the quantized weights."""
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    fp8, deq, names = {}, {}, []
    for name, t in tensors.items():
        if not is_quantized(name, t):
            fp8[name] = deq[name] = t
            continue
        names.append(name)
        parts = [quantize_matrix(m, block) for m in (t if t.dim() == 3 else [t])]
        stack = (lambda i: torch.stack([p[i] for p in parts])) if t.dim() == 3 else (lambda i: parts[0][i])
        fp8[name], fp8[name + "_scale_inv"], deq[name] = stack(0), stack(1), stack(2)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for out, tens, cfg in (
        (fp8_dir, fp8, {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                           "weight_block_size": list(block),
                                                           "activation_scheme": "dynamic"}}),
        (deq_dir, deq, {**config, "torch_dtype": "float32", "dtype": "float32"}),
    ):
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(src):
            if f.endswith(".json") and f not in ("config.json", "model.safetensors.index.json"):
                shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        save_file({k: v.contiguous() for k, v in tens.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
    return names


class Fp8Factory:
    """Session cache: ``get(arch, block, fused=False, **overrides)`` -> (fp8_dir, deq_dir, quantized names)."""

    def __init__(self, root: str, checkpoints):
        self.root, self.checkpoints, self.cache = root, checkpoints, {}

    def get(self, arch="deepseek_v3", block=(16, 24), fused=False, **overrides):
        key = (arch, tuple(block), fused, tuple(sorted(overrides.items())))
        if key not in self.cache:
            src, _ = self.checkpoints.get(arch, dtype="bfloat16", fused=fused, **overrides)
            base = os.path.join(self.root, f"{arch}-{block[0]}x{block[1]}-{'fused' if fused else 'per'}-{len(self.cache)}")
            fp8_dir, deq_dir = base + "-fp8", base + "-deq"
            self.cache[key] = (fp8_dir, deq_dir, quantize(src, fp8_dir, deq_dir, block))
        return self.cache[key]
