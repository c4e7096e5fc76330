"""Architecture specs: one parsed, validated description of a MoE checkpoint's shape, from its ``config.json``.

Everything downstream (checkpoint key mapping, the resident engine, the cost model and planner, the runtime)
reads a :class:`ModelSpec`, never the raw config, so every architecture quirk is decided here once.

Supported ``model_type`` values are the keys of :data:`PARSERS`; each architecture module registers its parser
with :func:`register`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, asdict, replace
from typing import Any, Callable


class UnsupportedModelError(ValueError):
    """The config names an architecture Klotski does not implement."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (``rope_type`` as in HF: default, linear, dynamic, yarn, llama3)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # yarn / llama3 / longrope extras, kept verbatim (original_max_position_embeddings, beta_fast, ...).
    extra: dict = field(default_factory=dict)
    interleaved: bool = False  # DeepSeek's rope_interleave: pairs (0,1),(2,3).. instead of halves


@dataclass(frozen=True)
class ModelSpec:
    """The shape and math of one decoder-only MoE model.

    Per-layer MLP kind is ``layer_kinds[i]`` in {"moe", "dense"}. Expert tensors use the canonical layout
    ``w13`` [E, 2*moe_intermediate_size, hidden_size] (gate rows, then up rows) and
    ``w2`` [E, hidden_size, moe_intermediate_size].
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers); 0 if the model has none
    moe_intermediate_size: int  # per-expert width
    num_experts: int
    top_k: int
    layer_kinds: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = field(default_factory=RopeSpec)
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2-MoE)
    qk_norm: str = "none"  # "none" | "head" (per-head RMSNorm, Qwen3-MoE) | "full" (full-width, OLMoE)
    clip_qkv: float | None = None  # OLMoE
    norm_topk_prob: bool = False
    router_scoring: str = "softmax"  # "softmax" | "sigmoid"
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # e_score_correction_bias present (DeepSeek-V3)
    num_shared_experts: int = 0  # DeepSeek: n_shared_experts experts of moe width, fused as one MLP
    shared_expert_intermediate_size: int = 0  # total width of the shared MLP (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(H, 1)) scales the shared expert
    attention: str = "gqa"  # "gqa" | "mla"
    # Multi-head latent attention (DeepSeek-V2/V3); zero when attention == "gqa".
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # fp8 block-scaled checkpoint (quantization_config quant_method "fp8"): the (rows, cols) weight block of
    # every ``*_scale_inv`` tensor; None for unquantized checkpoints. See :mod:`klotski.model.quant`.
    fp8_block: tuple[int, int] | None = None
    # pre-quantized 4-bit checkpoint (GPTQ / AWQ GEMM / compressed-tensors W4A16): its format
    # (:class:`klotski.quant.checkpoint_formats.Int4Format`); None otherwise. See :mod:`klotski.quant.linears`.
    int4_checkpoint: Any = None

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == "moe"]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == "dense"]

    def is_moe(self, layer: int) -> bool:
        return self.layer_kinds[layer] == "moe"

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_elems_per_token(self, layer: int = 0) -> int:
        """Elements one token adds to one layer's KV cache (K and V, or MLA's latent + rope key)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def weight_dtype(self) -> str:
        """Storage dtype of the linear weights: "float8_e4m3" for fp8 checkpoints, else ``torch_dtype``."""
        return "float8_e4m3" if self.fp8_block else self.torch_dtype

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelSpec":
        """Parse an HF ``config.json`` dict. Raises :class:`UnsupportedModelError` for unknown types and
        ValueError for a config that is not a JSON object or describes an impossible model."""
        if not isinstance(config, dict):
            raise ValueError(f"config.json must hold a JSON object, got a JSON {type(config).__name__}")
        model_type = config.get("model_type")
        parser = PARSERS.get(model_type)
        if parser is None:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(PARSERS))}"
            )
        try:
            spec = parser(config)
        except (KeyError, TypeError) as e:
            raise ValueError(f"config.json for model_type {model_type!r} is missing or has a malformed field "
                             f"({type(e).__name__}: {e})") from None
        check_spec(spec)
        block = parse_quantization(config)
        if block:
            return replace(spec, fp8_block=block)
        int4 = parse_int4_quantization(config)
        return replace(spec, int4_checkpoint=int4) if int4 else spec

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelSpec":
        path = os.path.join(os.fspath(model_dir), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {os.fspath(model_dir)!r} (expected {path})")
        with open(path) as f:
            try:
                config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_config(config)
        except UnsupportedModelError:
            raise
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def check_spec(spec: ModelSpec) -> None:
    """Refuse a config that cannot describe a working model (ValueError naming the fields)."""
    for name in ("vocab_size", "hidden_size", "num_layers", "max_position_embeddings"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.moe_layers:
        if spec.num_experts < 1:
            raise ValueError(f"the model has MoE layers but num_experts is {spec.num_experts}")
        if not 1 <= spec.top_k <= spec.num_experts:
            raise ValueError(f"num_experts_per_tok (top_k) must be between 1 and the number of experts "
                             f"({spec.num_experts}), got {spec.top_k}")


PARSERS: dict[str, Callable[[dict], ModelSpec]] = {}


def register(*model_types: str):
    """Decorator: register a ``config dict -> ModelSpec`` parser for the given ``model_type`` values."""

    def deco(fn):
        for t in model_types:
            PARSERS[t] = fn
        return fn

    return deco


# ---- shared parsing helpers ---------------------------------------------------------------------------

def parse_int4_quantization(config: dict):
    """The 4-bit format of a GPTQ / AWQ / compressed-tensors ``quantization_config`` (None for none or fp8);
    an unsupported setting raises :class:`UnsupportedModelError` naming it and listing what is supported."""
    from klotski.quant.checkpoint_formats import UnsupportedQuantization, parse_int4_checkpoint

    try:
        return parse_int4_checkpoint(config)
    except UnsupportedQuantization as e:
        raise UnsupportedModelError(str(e)) from None


def parse_quantization(config: dict) -> tuple[int, int] | None:
    """The fp8 weight block of ``quantization_config`` (None when the config declares none or another method,
    which :func:`parse_int4_quantization` reads or refuses).

    Supported: ``quant_method`` "fp8", ``fmt`` "e4m3", 2-D ``weight_block_size``, ``activation_scheme``
    "dynamic" (activations are never quantized here: weights are dequantized to the compute dtype).
    Any other fp8 setting raises :class:`UnsupportedModelError` naming the field.
    """
    q = config.get("quantization_config")
    if not q:
        return None
    where = f"config.json ({config.get('model_type')}) quantization_config"
    method = str(q.get("quant_method", "")).lower()
    if method != "fp8":
        return None  # 4-bit formats: parse_int4_quantization (refuses every other method by name)
    fmt = str(q.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise UnsupportedModelError(f"{where}: fp8 fmt {q.get('fmt')!r} is not supported; supported: 'e4m3'")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UnsupportedModelError(f"{where}: weight_block_size must be two positive ints [rows, cols] "
                                    f"(per-block scales), got {block!r}; per-tensor / per-channel fp8 is not supported")
    scheme = str(q.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise UnsupportedModelError(f"{where}: activation_scheme {q.get('activation_scheme')!r} is not supported; "
                                    f"supported: 'dynamic'")
    return (int(block[0]), int(block[1]))


def require(config: dict, key: str):
    if key not in config or config[key] is None:
        raise ValueError(f"config.json ({config.get('model_type')}): missing required field {key!r}")
    return config[key]


def parse_rope(config: dict, default_theta: float = 10000.0) -> RopeSpec:
    """Read RoPE from v5 ``rope_parameters`` or legacy ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    legacy = dict(config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or default_theta
    merged = {**legacy, **params}
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    factor = float(merged.pop("factor", 1.0) or 1.0)
    supported = ("default", "linear", "dynamic", "yarn", "llama3")
    if rope_type not in supported:
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(supported)}")
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        extra=merged,
        interleaved=bool(config.get("rope_interleave", False)),
    )


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def common_fields(config: dict) -> dict:
    """Fields every GQA architecture here shares."""
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return dict(
        model_type=config["model_type"],
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        hidden_act=str(config.get("hidden_act", "silu")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", ""),
    )


def sparse_layer_kinds(config: dict, num_layers: int, num_experts: int) -> tuple[str, ...]:
    """Qwen-style: MoE where not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    step = int(config.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(config.get("mlp_only_layers") or [])
    return tuple(
        "moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % step == 0) else "dense"
        for i in range(num_layers)
    )
