"""Validate a checkpoint against its spec and load Klotski's canonical per-layer weights from it.

The canonical names and their HF sources are in :mod:`klotski.model.names`. Routed experts are read one at a time: ``w13`` [2I, H] (gate rows, then up rows), ``w2`` [H, I].

Two expert key layouts are read:
* per-expert: ``{moe}.experts.{e}.w1/w3/w2.weight`` (Mixtral) or ``.gate_proj/up_proj/down_proj.weight``;
* fused 3-D: ``{moe}.experts.gate_up_proj`` [E, 2I, H] and ``{moe}.experts.down_proj`` [E, H, I].
``{moe}`` is ``model.layers.{i}.mlp`` or ``model.layers.{i}.block_sparse_moe``.
"""
from __future__ import annotations

import re

import torch

from klotski.checkpoint import CheckpointError, SafetensorsIndex, TensorInfo
from klotski.model.names import (  # noqa: F401  (re-exported)
    ATTENTION_SOURCES, EXTRA_IGNORED, IGNORED, KEEP_FP32, ExpertLayout, Source, expert_names, global_sources,
    layer_sources,
)
from klotski.model.spec import ModelSpec


def detect_layout(index: SafetensorsIndex, spec: ModelSpec) -> ExpertLayout:
    """Find which expert key layout the checkpoint uses (looked up on its first MoE layer)."""
    if not spec.moe_layers:
        return ExpertLayout("mlp", False, ("gate_proj", "up_proj", "down_proj"))
    layer = spec.moe_layers[0]
    for prefix in ("mlp", "block_sparse_moe"):
        base = f"model.layers.{layer}.{prefix}.experts"
        if f"{base}.gate_up_proj" in index:
            return ExpertLayout(prefix, True, ("gate_proj", "up_proj", "down_proj"))
        for proj in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
            if f"{base}.0.{proj[0]}.weight" in index:
                return ExpertLayout(prefix, False, proj)
    raise CheckpointError(
        f"{index.model_dir}: cannot find layer {layer}'s experts: expected "
        f"'model.layers.{layer}.mlp.experts.gate_up_proj' (fused) or "
        f"'model.layers.{layer}.mlp.experts.0.w1.weight' / '...experts.0.gate_proj.weight' (per expert)"
    )


class CheckpointWeights:
    """A validated checkpoint: canonical tensor sources for every layer and per-expert byte locations."""

    def __init__(self, index: SafetensorsIndex, spec: ModelSpec, extra_ignored: tuple[re.Pattern, ...] = ()):
        self.index = index
        self.spec = spec
        self.layout = detect_layout(index, spec)
        self.globals = global_sources(spec, index)
        self.layers = [layer_sources(spec, i, self.layout) for i in range(spec.num_layers)]
        by_model = EXTRA_IGNORED.get(spec.model_type)
        self._validate(IGNORED + (by_model(spec) if by_model else ()) + tuple(extra_ignored))

    def _validate(self, ignored) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for sources in [self.globals, *self.layers]:
            for src in sources.values():
                expected.update(zip(src.names, src.shapes))
        for layer in self.spec.moe_layers:
            expected.update(expert_names(self.spec, layer, self.layout))
        problems = []
        for name, shape in expected.items():
            if name not in self.index:
                problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
                continue
            info = self.index[name]
            if tuple(info.shape) != tuple(shape):
                problems.append(
                    f"tensor {name!r} in {info.path}: expected shape {list(shape)}, got {list(info.shape)}"
                )
        extra = [n for n in self.index.names() if n not in expected and not any(p.match(n) for p in ignored)]
        problems += [f"unexpected tensor {n!r} in {self.index[n].path}" for n in sorted(extra)]
        if problems:
            head = f"checkpoint {self.index.model_dir} does not match its config ({self.spec.model_type}):"
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise CheckpointError("\n  ".join([head, *shown]))

    # ---- reading ---------------------------------------------------------------------------------------
    def read_source(self, src: Source) -> torch.Tensor:
        parts = [self.index.read(n) for n in src.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def read_global(self) -> dict[str, torch.Tensor]:
        return {k: self.read_source(s) for k, s in self.globals.items()}

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's non-routed-expert tensors (CPU, checkpoint dtype)."""
        return {k: self.read_source(s) for k, s in self.layers[layer].items()}

    def expert_pieces(self, layer: int, expert: int) -> tuple[list[TensorInfo], TensorInfo]:
        """Byte locations of one expert: (w13 pieces in row order, w2). Fused layouts give one w13 piece."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused:
            return (
                [self.index[f"{base}.gate_up_proj"].row_slice(expert)],
                self.index[f"{base}.down_proj"].row_slice(expert),
            )
        g, u, d = self.layout.proj
        return (
            [self.index[f"{base}.{expert}.{g}.weight"], self.index[f"{base}.{expert}.{u}.weight"]],
            self.index[f"{base}.{expert}.{d}.weight"],
        )

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, reading only its bytes."""
        w13_pieces, w2_info = self.expert_pieces(layer, expert)
        w13 = torch.cat([self.index.read(p) for p in w13_pieces], dim=0)
        return w13, self.index.read(w2_info)

    def read_experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a layer: (w13 [E, 2I, H], w2 [E, H, I])."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused:
            return self.index.read(f"{base}.gate_up_proj"), self.index.read(f"{base}.down_proj")
        pairs = [self.read_expert(layer, e) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
