"""Helpers for int4 tests: the checkpoint an int4 store dequantizes to, and budgets that force a disk tier."""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file


def dequantized_checkpoint(model_dir: str, store_dir: str, out_dir: str) -> str:
    """``model_dir`` with every routed expert replaced by its int4 store record's dequantized values, all
    tensors in fp32 (one safetensors file, the source's key layout)."""
    from klotski.model.names import expert_names
    from klotski.model.spec import ModelSpec
    from klotski.model.weights import detect_layout
    from klotski.checkpoint import SafetensorsIndex
    from klotski.store import ExpertStore

    spec = ModelSpec.from_pretrained(model_dir)
    layout = detect_layout(SafetensorsIndex(model_dir), spec)
    store = ExpertStore(store_dir)
    assert store.int4 is not None
    tensors = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, f)))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    I = spec.moe_intermediate_size
    for layer in spec.moe_layers:
        names = list(expert_names(spec, layer, layout))
        for e in range(spec.num_experts):
            w13, w2 = (w.dequantize(torch.float32) for w in store.read_expert(layer, e, verify=True))
            if layout.fused:
                tensors[names[0]][e] = w13
                tensors[names[1]][e] = w2
            else:
                gate, up, down = names[3 * e: 3 * e + 3]
                tensors[gate], tensors[up], tensors[down] = w13[:I].clone(), w13[I:].clone(), w2.clone()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = config["dtype"] = "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def tight_budgets(model_dir: str, policy: str, store_dir: str, step: float = 1.1, **kw) -> tuple[int, int]:
    """(gpu, cpu) budgets just above the smallest the runtime accepts for ``policy`` on int4 experts with 2
    batches of 2 (start from the runtime's and the planner's refusal messages, then grow both by ``step``
    until accepted): weights stream from disk."""
    from klotski import LLM
    from klotski.runtime import BudgetError
    from klotski.units import parse_bytes

    def attempt(gpu, cpu) -> str | None:
        try:
            LLM(model_dir, device="cpu", dtype="float32", policy=policy, gpu_memory=gpu, cpu_memory=cpu,
                offload_dir=store_dir, num_batches=2, batch_size=2, quantization="int4", **kw).close()
        except (BudgetError, ValueError) as e:
            return str(e)
        return None

    size = lambda text: int(parse_bytes(text.replace(" ", "")))  # noqa: E731
    gpu = size(re.search(r"needs at least ([0-9.]+ ?[KMG]?i?B)", attempt(1024, None)).group(1))
    smallest = re.search(r"needs GPU >= ([0-9.]+ ?[KMG]?i?B) and CPU >= ([0-9.]+ ?[KMG]?i?B)",
                         attempt(int(gpu * 1.3), 1024))
    gpu, cpu = max(gpu, size(smallest.group(1))), size(smallest.group(2))
    for _ in range(30):
        if attempt(gpu, cpu) is None:
            return gpu, cpu
        gpu, cpu = int(gpu * step), int(cpu * step)
    raise AssertionError(f"no budgets accepted up to gpu {gpu} / cpu {cpu}")
