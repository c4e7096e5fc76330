"""Pre-quantized 4-bit checkpoints for tests, written by an independent float64 packer (numpy, not Klotski).

:func:`write_prequantized` quantizes a tiny checkpoint's linear layers (attention, dense MLPs, shared and
routed experts; not routers, norms, embeddings or the LM head) round-to-nearest per group in float64 and
writes them in one of the formats as the quantizers that produce them do (AutoGPTQ / GPTQModel ``gptq`` v1
and ``gptq_v2``, AutoAWQ GEMM, compressed-tensors ``pack-quantized``), with a ``quantization_config``; and
beside it the same model with every quantized layer replaced by its dequantized values in fp32 (the reference
the tests compare against). Scales are fp16, as those tools store them.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_COLUMN_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column AWQ_COLUMN_ORDER[i]


def rtn(w: np.ndarray, group: int, symmetric: bool):
    """float64 round-to-nearest of w [N, K]: (codes [N, K] 0..15, scales [N, K/G] as fp16 values, zeros [N, K/G])."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    if symmetric:
        amax = np.abs(g).max(-1)
        scale = np.where(amax > 0, amax / 7.5, 1.0)
    else:
        lo, hi = np.minimum(g.min(-1), 0.0), np.maximum(g.max(-1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
    scale = scale.astype(np.float16).astype(np.float64)
    zero = np.full_like(scale, 8.0) if symmetric else np.clip(np.round(-lo / scale), 0, 15)
    codes = np.clip(np.round(g / scale[..., None] + zero[..., None]), 0, 15)
    return codes.reshape(n, k).astype(np.int64), scale, zero.astype(np.int64)


def pack_words(codes: np.ndarray, axis: int, order=None) -> np.ndarray:
    """Eight 4-bit codes per int32 word along ``axis`` (code i at bits 4i; ``order``: which of the 8 goes to
    nibble i), padded with zeros to a multiple of 8."""
    c = np.moveaxis(codes, axis, -1)
    pad = -c.shape[-1] % 8
    c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), dtype=c.dtype)], -1) if pad else c
    c = c.reshape(*c.shape[:-1], -1, 8).astype(np.uint64)
    order = order or list(range(8))
    words = np.zeros(c.shape[:-1], dtype=np.uint64)
    for i in range(8):
        words |= (c[..., order[i]] & 0xF) << np.uint64(4 * i)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def quantized_tensors(base: str, w: np.ndarray, method: str, group: int, symmetric: bool, v2: bool):
    """(the format's tensors of layer ``base``, the dequantized weight [N, K] float64)."""
    n, k = w.shape
    codes, scale, zero = rtn(w, group, symmetric)
    zero_used = zero
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if method == "gptq":
        stored_zero = zero if v2 else (zero - 1) & 0xF  # v1 stores zero - 1 (a zero point 0 reads back as 16)
        zero_used = stored_zero if v2 else stored_zero + 1
        out = {f"{base}.qweight": t(pack_words(codes.T, 0)), f"{base}.scales": t(scale.T.astype(np.float16)),
               f"{base}.qzeros": t(pack_words(stored_zero.T, 1)),
               f"{base}.g_idx": t((np.arange(k) // group).astype(np.int32))}
    elif method == "awq":
        out = {f"{base}.qweight": t(pack_words(codes.T, 1, AWQ_COLUMN_ORDER)),
               f"{base}.scales": t(scale.T.astype(np.float16)),
               f"{base}.qzeros": t(pack_words(zero.T, 1, AWQ_COLUMN_ORDER))}
    else:  # compressed-tensors: stored nibble = signed value + 8 (= the unsigned code)
        out = {f"{base}.weight_packed": t(pack_words(codes, 1)), f"{base}.weight_scale": t(scale.astype(np.float16)),
               f"{base}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if not symmetric:
            out[f"{base}.weight_zero_point"] = t(pack_words(zero, 0))
    deq = (codes - np.repeat(zero_used, group, axis=1)) * np.repeat(scale, group, axis=1)
    return out, deq


def quantization_config(method: str, group: int, symmetric: bool, v2: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": symmetric,
                "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": not symmetric, "version": "gemm"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group}}}}


def is_quantizable(name: str, shape, method: str, group: int) -> bool:
    if not (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2):
        return False
    if "norm" in name or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
        return False  # norms and routers stay unquantized, as the quantizers leave them
    n, k = shape
    g = k if group == -1 else group
    return k % 8 == 0 and k % g == 0 and (method != "awq" or n % 8 == 0)


def write_prequantized(model_dir: str, out_dir: str, ref_dir: str, method: str, group: int, symmetric: bool,
                       v2: bool = False) -> list[str]:
    """Write the 4-bit checkpoint of ``model_dir`` to ``out_dir`` and its dequantized fp32 twin to ``ref_dir``;
    returns the quantized layers' names."""
    tensors = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, f)))
    quant, ref, done = {}, {}, []
    for name, value in tensors.items():
        value = value.float() if value.is_floating_point() else value
        if is_quantizable(name, value.shape, method, group):
            base = name[: -len(".weight")]
            g = value.shape[1] if group == -1 else group
            parts, deq = quantized_tensors(base, value.double().numpy(), method, g, symmetric, v2)
            quant.update(parts)
            ref[name] = torch.from_numpy(deq).float()
            done.append(name)
        else:
            quant[name] = ref[name] = value
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = config["dtype"] = "float32"
    for d, ts, cfg in ((out_dir, quant, {**config, "quantization_config": quantization_config(method, group,
                                                                                                symmetric, v2)}),
                       (ref_dir, ref, config)):
        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ts.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
    return done
