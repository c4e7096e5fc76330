"""Offloaded runs over int4 experts (``LLM(..., quantization="int4")``).

The routed experts come from an int4 packed store in ``offload_dir`` (converted from the checkpoint on first
use, as ``klotski convert MODEL_DIR OFFLOAD_DIR --quantize int4`` would), on every tier: device pool slots hold
codes + scales (+ zero points) as stored, host copies and disk reads are the stored records, and the kernels
compute from them. Dense weights, norms, router and embeddings come from the checkpoint in its dtype.
The planner prices each expert at its stored bytes, on the device too (:meth:`ModelCosts.with_expert_bytes`).

A pre-quantized 4-bit checkpoint (GPTQ / AWQ GEMM / compressed-tensors W4A16) runs offloaded this way whether
or not ``quantization="int4"`` is passed: its experts are converted once, as stored, into the store, and its
other quantized linears are dequantized into the store's ``non_expert.safetensors``, which the host and disk
tiers then read (:meth:`~klotski.model.weights.CheckpointWeights.use_dequantized`).
"""
from __future__ import annotations

from dataclasses import replace

from klotski.model.weights import CheckpointWeights

QUANTIZATIONS = ("int4",)


def default_group_size(spec, largest: int = 128) -> int:
    """The largest power-of-two group size <= ``largest`` dividing both hidden_size and moe_intermediate_size."""
    g = largest
    while g > 2 and (spec.hidden_size % g or spec.moe_intermediate_size % g):
        g //= 2
    return g


def check_quantization(quantization, spec=None) -> str | None:
    """``quantization`` checked; "int4" for a pre-quantized 4-bit checkpoint (``spec.int4_checkpoint``)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
    if spec is not None and spec.int4_checkpoint is not None:
        return "int4"
    return quantization


def open_int4_store(weights: CheckpointWeights, store_dir: str | None, rebuild: bool = False):
    """The int4 expert store of this checkpoint in ``store_dir`` (converted from the checkpoint when missing or
    unfinished; another checkpoint's store, or one holding unquantized experts, is refused unless ``rebuild``)."""
    from klotski.store import open_store

    spec = weights.spec
    if store_dir is None:
        what = (f"a pre-quantized {spec.int4_checkpoint.method} checkpoint" if spec.int4_checkpoint is not None
                else "quantization='int4'")
        raise ValueError(f"{what} needs an offload_dir when offloaded: the int4 experts live in the packed store "
                         "there (converted on first use, or beforehand with `klotski convert MODEL_DIR "
                         "OFFLOAD_DIR --quantize int4`)")
    if not spec.moe_layers:
        raise ValueError(f"quantization='int4' quantizes routed experts, and {spec.model_type} at "
                         f"{weights.index.model_dir} has no MoE layer")
    store = open_store(weights.index, store_dir, rebuild=rebuild,
                       quantize="int4", group_size=default_group_size(spec))
    try:
        check_store_shapes(store, spec, store_dir)
        if weights.int4 is not None:  # the dequantized non-expert layers converted beside the experts
            weights.use_dequantized(store.non_expert_path)
    except BaseException:
        store.close()
        raise
    return store


def check_store_shapes(store, spec, store_dir: str) -> None:
    m = store.manifest
    want = {"num_experts": spec.num_experts, "moe_layers": list(spec.moe_layers), "hidden_size": spec.hidden_size,
            "moe_intermediate_size": spec.moe_intermediate_size}
    bad = [f"{k} {m.get(k)!r} (checkpoint: {v!r})" for k, v in want.items() if m.get(k) != v]
    if bad:
        raise ValueError(f"expert store {store_dir} was converted from another model: {', '.join(bad)}; use "
                         f"another offload_dir or convert again")


def expert_nbytes(store) -> int:
    """Stored bytes of the largest expert (codes, scales and zero points of w13 + w2, no record padding)."""
    return max(sum(t.nbytes for t in rec.tensors) for rec in store.records())


def int4_costs(store, mb, costs):
    """(ModelBytes, ModelCosts) with every routed expert at its int4 stored size, on the device too."""
    q = expert_nbytes(store)
    return replace(mb, expert=q, expert_ckpt=q), costs.with_expert_bytes(q)
