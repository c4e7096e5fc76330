"""Validate a checkpoint against its spec and load Klotski's canonical per-layer weights from it.

The canonical names and their HF sources are in :mod:`klotski.model.names`. Routed experts are read one at a time: ``w13`` [2I, H] (gate rows, then up rows), ``w2`` [H, I].

Two expert key layouts are read:
* per-expert: ``{moe}.experts.{e}.w1/w3/w2.weight`` (Mixtral) or ``.gate_proj/up_proj/down_proj.weight``;
* fused 3-D: ``{moe}.experts.gate_up_proj`` [E, 2I, H] and ``{moe}.experts.down_proj`` [E, H, I].
``{moe}`` is ``model.layers.{i}.mlp`` or ``model.layers.{i}.block_sparse_moe``.

fp8 block-scaled checkpoints (``quantization_config`` quant_method "fp8", :mod:`klotski.model.quant`): any
weight may be stored as ``float8_e4m3fn`` with ``<name>_scale_inv`` beside it (DeepSeek-V3: every linear weight
but the embeddings, LM head and router). The ``read_*`` methods return such weights dequantized (fp32, or the
given dtype); ``read_*_stored`` return them as stored (:class:`~klotski.model.quant.Fp8Weight`) for the host
tier and the packed store; :meth:`CheckpointWeights.info` / :meth:`expert_pieces` attach the scales' byte
locations to a weight's :class:`~klotski.checkpoint.TensorInfo` for the disk tier.

Pre-quantized 4-bit checkpoints (GPTQ / AWQ GEMM / compressed-tensors W4A16, ``spec.int4_checkpoint``): any
linear weight may be stored as the format's codes + scales (+ zero points) in place of ``<base>.weight``
(:mod:`klotski.quant.linears`); :attr:`CheckpointWeights.quantized` maps each such logical weight name to its
layer. Routed experts are read in the int4 slot layout as stored (:meth:`read_expert_int4`, what the int4
store is converted from); every other quantized linear is dequantized at load into :attr:`dequant_dtype` (the
checkpoint's ``torch_dtype``): ``read_*`` return it dequantized, and once an int4 store is open its
``non_expert.safetensors`` holds the dequantized copies, which the host and disk tiers then read
(:meth:`use_dequantized`).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from klotski.checkpoint import CheckpointError, SafetensorsIndex, TensorInfo
from klotski.model.names import (  # noqa: F401  (re-exported)
    ATTENTION_SOURCES, EXTRA_IGNORED, IGNORED, KEEP_FP32, ExpertLayout, Source, expert_names, global_sources,
    layer_sources,
)
from klotski.model.quant import FP8_DTYPE, SCALE_SUFFIX, Fp8Weight, concat, scale_name, scale_shape
from klotski.model.spec import ModelSpec
from klotski.quant.int4 import Int4Weight
from klotski.quant.linears import concat_rows, find_quantized_linear

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DEQUANT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _quantized_marker(index: SafetensorsIndex, spec: ModelSpec, base: str) -> bool:
    """Whether the linear ``base`` is stored as a 4-bit layer of the checkpoint's format."""
    fmt = spec.int4_checkpoint
    marker = "weight_packed" if fmt is not None and fmt.method == "compressed-tensors" else "qweight"
    return fmt is not None and f"{base}.{marker}" in index


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
            if f"{base}.0.{proj[0]}.weight" in index or _quantized_marker(index, spec, f"{base}.0.{proj[0]}"):
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
        self.block = spec.fp8_block
        self.scales: dict[str, TensorInfo] = {}  # fp8 weight name -> its block scale
        self.int4 = spec.int4_checkpoint  # Int4Format of a pre-quantized 4-bit checkpoint, else None
        self.quantized: dict = {}  # logical weight name -> QuantizedLinear (4-bit checkpoints)
        self.dequantized_infos: dict[str, TensorInfo] = {}  # quantized non-expert name -> its dequantized copy
        self.dequant_dtype = DEQUANT_DTYPES.get(spec.torch_dtype, torch.float16)
        self.expert_keys: set[str] = set()
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
            names = expert_names(self.spec, layer, self.layout)
            expected.update(names)
            self.expert_keys.update(names)
        problems = []
        for name, shape in expected.items():
            if name not in self.index:
                found, why = (None, []) if self.int4 is None else find_quantized_linear(self.index, self.int4, name,
                                                                                        shape)
                if found is not None:
                    self.quantized[name] = found
                problems += why if found is not None or why else [f"missing tensor {name!r} (expected shape "
                                                                   f"{list(shape)})"]
                continue
            info = self.index[name]
            if tuple(info.shape) != tuple(shape):
                problems.append(
                    f"tensor {name!r} in {info.path}: expected shape {list(shape)}, got {list(info.shape)}"
                )
        problems += self._check_scales(expected)
        fp8 = [n for n in expected if n in self.index and self.index[n].dtype in FLOAT8]
        used = set(expected) | {scale_name(n) for n in fp8}  # checked by _check_scales
        used.update(p for q in self.quantized.values() for p in q.part_names())
        if self.int4 is not None and not self.quantized and not problems:
            problems.append(f"config.json declares a {self.int4.method} 4-bit quantization_config but no linear "
                            f"weight is stored in that format")
        extra = [n for n in self.index.names() if n not in used and not any(p.match(n) for p in ignored)]
        for n in sorted(extra):
            problems.append(self._stray_scale(n) or f"unexpected tensor {n!r} in {self.index[n].path}")
        if problems:
            head = f"checkpoint {self.index.model_dir} does not match its config ({self.spec.model_type}):"
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise CheckpointError("\n  ".join([head, *shown]))

    def _check_scales(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """fp8 weights need a scale of the right shape, and only fp8 checkpoints may hold them; fills
        ``self.scales``."""
        fp8 = [n for n in expected if n in self.index and self.index[n].dtype in FLOAT8]
        if fp8 and self.block is None:
            return [f"{len(fp8)} tensor(s) stored as fp8 (e.g. {fp8[0]!r} in {self.index[fp8[0]].path}) but "
                    f"config.json declares no fp8 quantization_config (quant_method 'fp8' with weight_block_size)"]
        problems = []
        for name in fp8:
            info = self.index[name]
            where = f"tensor {name!r} in {info.path}"
            if info.dtype != FP8_DTYPE:
                problems.append(f"{where}: expected {FP8_DTYPE} (quantization_config fmt 'e4m3'), got {info.dtype}")
                continue
            sname = scale_name(name)
            if sname not in self.index:
                problems.append(f"{where} is fp8 but its block scale {sname!r} is missing (expected shape "
                                f"{list(scale_shape(info.shape, self.block))}, float32)")
                continue
            sinfo = self.index[sname]
            want = scale_shape(info.shape, self.block)
            if tuple(sinfo.shape) != want:
                problems.append(f"block scale {sname!r} in {sinfo.path} of {list(info.shape)} weight {name!r} "
                                f"(weight_block_size {list(self.block)}): expected shape {list(want)}, "
                                f"got {list(sinfo.shape)}")
            elif not sinfo.dtype.is_floating_point or sinfo.dtype in FLOAT8:
                problems.append(f"block scale {sname!r} in {sinfo.path}: expected float32, got {sinfo.dtype}")
            else:
                self.scales[name] = sinfo
        return problems

    def _stray_scale(self, name: str) -> str | None:
        """Why ``name`` (not used by any weight) looks like a block scale, or None if it does not."""
        if not name.endswith(SCALE_SUFFIX):
            return None
        where = f"tensor {name!r} in {self.index[name].path}"
        if self.block is None:
            return (f"{where} is an fp8 block scale but config.json declares no quantization_config "
                    f"(quant_method 'fp8'); refusing to ignore it")
        weight = name[: -len(SCALE_SUFFIX)]
        if weight in self.index:
            return (f"{where} is a block scale of {weight!r}, which is stored as {self.index[weight].dtype}, "
                    f"not {FP8_DTYPE}")
        return None

    # ---- reading ---------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name``'s bytes live, with its block scale's location attached if it is fp8. A 4-bit
        quantized layer: its dequantized copy in the open int4 store, else an info carrying the layer
        (``TensorInfo.int4``; read by :meth:`read_stored`, never raw)."""
        if name in self.dequantized_infos:
            return self.dequantized_infos[name]
        q = self.quantized.get(name)
        if q is not None:
            marker = next(iter(q.parts.values()))
            size = torch.empty((), dtype=self.dequant_dtype).element_size()
            return TensorInfo(name, marker.path, marker.offset, q.shape[0] * q.shape[1] * size, self.dequant_dtype,
                              q.shape, int4=q)
        info = self.index[name]
        scale = self.scales.get(name)
        return info if scale is None else replace(info, scale_inv=scale)

    def read_stored(self, info: TensorInfo) -> "torch.Tensor | Fp8Weight":
        """One tensor as stored: a CPU tensor, or an :class:`Fp8Weight` when ``info`` carries a scale; a 4-bit
        layer dequantized into :attr:`dequant_dtype`."""
        if info.int4 is not None:
            return info.int4.read(self.index).dequantize(info.dtype)
        if info.scale_inv is None:
            return self.index.read(info)
        return Fp8Weight(self.index.read(info), self.index.read(info.scale_inv).float(), (info.shape[0],),
                         self.block)

    def read_info(self, info: TensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized if fp8 (into fp32, or ``dtype``); unquantized tensors as stored."""
        t = self.read_stored(info)
        return dequantized(t, dtype)

    def read_source_stored(self, src: Source) -> "torch.Tensor | Fp8Weight":
        return concat([self.read_stored(self.info(n)) for n in src.names])

    def read_source(self, src: Source, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A canonical tensor (CPU): checkpoint dtype, or dequantized (fp32 / ``dtype``) if stored in fp8."""
        return dequantized(self.read_source_stored(src), dtype)

    def read_global(self) -> dict[str, torch.Tensor]:
        return {k: self.read_source(s) for k, s in self.globals.items()}

    def read_layer(self, layer: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The layer's non-routed-expert tensors (CPU, checkpoint dtype; fp8 ones dequantized)."""
        return {k: self.read_source(s, dtype) for k, s in self.layers[layer].items()}

    def expert_pieces(self, layer: int, expert: int) -> tuple[list[TensorInfo], TensorInfo]:
        """Byte locations of one expert: (w13 pieces in row order, w2). Fused layouts give one w13 piece.
        fp8 pieces carry their scales' locations (``TensorInfo.scale_inv``)."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused:
            return (
                [self.info(f"{base}.gate_up_proj").row_slice(expert)],
                self.info(f"{base}.down_proj").row_slice(expert),
            )
        g, u, d = self.layout.proj
        return (
            [self.info(f"{base}.{expert}.{g}.weight"), self.info(f"{base}.{expert}.{u}.weight")],
            self.info(f"{base}.{expert}.{d}.weight"),
        )

    def read_expert_stored(self, layer: int, expert: int):
        """(w13 [2I, H], w2 [H, I]) of one expert as stored (tensors, or :class:`Fp8Weight` for fp8)."""
        w13_pieces, w2_info = self.expert_pieces(layer, expert)
        return concat([self.read_stored(p) for p in w13_pieces]), self.read_stored(w2_info)

    def read_expert_int4(self, layer: int, expert: int) -> tuple[Int4Weight, Int4Weight]:
        """(w13 [2I, H], w2 [H, I]) of one expert of a 4-bit checkpoint, in the int4 slot layout as stored
        (gate and up rows stacked; each with its own group size, see :func:`klotski.quant.linears.regroup`)."""
        w13_pieces, w2_info = self.expert_pieces(layer, expert)
        missing = [i.name for i in (*w13_pieces, w2_info) if i.int4 is None]
        if missing:
            raise CheckpointError(f"{self.index.model_dir}: expert weight {missing[0]!r} is not stored as a "
                                  f"{self.int4.method if self.int4 else '4-bit'} layer; a checkpoint whose routed "
                                  f"experts are partly unquantized is not supported")
        return concat_rows([p.int4.read(self.index) for p in w13_pieces]), w2_info.int4.read(self.index)

    def use_dequantized(self, path: str) -> None:
        """Read every quantized non-expert layer from its dequantized copy in the safetensors file ``path``
        (an int4 store's ``non_expert.safetensors``): the host and disk tiers then move plain tensors."""
        from klotski.checkpoint import index_file

        infos = index_file(path)
        for name, q in self.quantized.items():
            if name in self.expert_keys:
                continue
            info = infos.get(name)
            if info is None or info.dtype != self.dequant_dtype or tuple(info.shape) != q.shape:
                got = "absent" if info is None else f"{info.dtype} {list(info.shape)}"
                raise CheckpointError(f"{path} should hold the dequantized {name!r} ({self.dequant_dtype} "
                                      f"{list(q.shape)}), got {got}: the store was not converted from this "
                                      f"{self.int4.method} checkpoint; convert it again")
            self.dequantized_infos[name] = info

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, reading only its bytes (fp8: dequantized, fp32 or ``dtype``)."""
        w13, w2 = self.read_expert_stored(layer, expert)
        return dequantized(w13, dtype), dequantized(w2, dtype)

    def read_experts(self, layer: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a layer: (w13 [E, 2I, H], w2 [E, H, I])."""
        base = f"model.layers.{layer}.{self.layout.moe_prefix}.experts"
        if self.layout.fused and not self.scales:
            return self.index.read(f"{base}.gate_up_proj"), self.index.read(f"{base}.down_proj")
        pairs = [self.read_expert(layer, e, dtype) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def dequantized(t: "torch.Tensor | Fp8Weight", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` itself if unquantized, else its dequantized values (fp32, or rounded once to ``dtype``)."""
    if isinstance(t, torch.Tensor):
        return t
    return t.dequantize(None if dtype is None else torch.empty(tuple(t.shape), dtype=dtype))
