"""Cost model: bytes and FLOPs of every tensor class of a :class:`~klotski.model.ModelSpec`, and seconds per op.

Two halves, one place for every parameter:

* :class:`ModelCosts` (hardware-free): per layer, the bytes of attention, norms, gate, one routed expert,
  shared experts (or the dense MLP of a dense layer) and the KV cache per token; FLOPs of attention
  (prefill / decode, by KV length), gate, one expert and the shared MLP for a token count.
* :func:`op_seconds` turns one schedule op into seconds on a :class:`~klotski.hardware.HardwareProfile`
  (roofline per op: ``max(flops / rate, bytes / memory bandwidth) + launch overhead``; copies:
  ``latency + bytes / link bandwidth``). Fitting the profile to a measured run is
  :func:`klotski.calibration.calibrate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from klotski.model import ModelSpec

DTYPE_BYTES = {
    "float32": 4.0, "float": 4.0, "bfloat16": 2.0, "float16": 2.0, "half": 2.0,
    "float8": 1.0, "float8_e4m3": 1.0, "int8": 1.0, "int4": 0.5,
}


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def weight_dtype_of(config: dict) -> str:
    """The storage dtype of a checkpoint's weights from its config.json (fp8 quantization_config wins)."""
    q = config.get("quantization_config") or {}
    if str(q.get("quant_method", "")).lower() == "fp8":
        return "float8_e4m3"
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")


@dataclass(frozen=True)
class LayerCosts:
    """Bytes of one decoder layer's tensor classes and the parameter counts its FLOPs come from."""

    index: int
    kind: str  # "moe" | "dense"
    attn_bytes: int  # q/k/v/o projections (MLA: q_a/q_b/kv_a/kv_b/o + latent norms), biases, q/k norms
    norm_bytes: int  # input + post-attention RMSNorm
    gate_bytes: int  # router (+ Qwen2-MoE shared-expert gate is counted in shared_bytes)
    expert_bytes: int  # one routed expert (w13 + w2); 0 on dense layers
    shared_bytes: int  # shared experts (+ their gate) on MoE layers, the dense MLP on dense layers
    num_experts: int
    top_k: int
    kv_bytes_per_token: int  # what one token adds to this layer's KV cache
    attn_params: int  # projection parameters (matmul FLOPs = 2 * tokens * attn_params)
    expert_params: int
    shared_params: int

    @property
    def weight_bytes(self) -> int:
        """All weights of the layer."""
        return (self.attn_bytes + self.norm_bytes + self.gate_bytes + self.num_experts * self.expert_bytes
                + self.shared_bytes)


@dataclass(frozen=True)
class ModelCosts:
    """Hardware-free costs of a model: per-layer bytes and FLOP formulas."""

    name: str
    spec: ModelSpec
    weight_dtype: str  # storage dtype of the weights (bytes moved)
    act_dtype: str  # activations / KV cache / matmul rate lookup
    layers: tuple[LayerCosts, ...]
    embed_bytes: int
    lm_head_bytes: int
    device_dtype: str | None = None  # dtype of weights once on the device (None: weight_dtype); the runtime
    # upcasts bf16 checkpoints to fp32 on CPU, doubling what a placed or streamed weight holds on the device
    experts_as_stored: bool = False  # int4 experts: the device pool holds routed experts as stored (codes +
    # scales), so their device bytes are their stored bytes whatever the compute dtype

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ModelSpec, weight_dtype: str | None = None, act_dtype: str | None = None,
                  name: str = "") -> "ModelCosts":
        weight_dtype = weight_dtype or spec.weight_dtype or "bfloat16"  # fp8 checkpoints: "float8_e4m3"
        if act_dtype is None:
            act_dtype = weight_dtype if dtype_bytes(weight_dtype) >= 2 else "bfloat16"
        wb, ab = dtype_bytes(weight_dtype), dtype_bytes(act_dtype)
        h = spec.hidden_size
        attn_params = _attn_params(spec)
        norm_params = 2 * h
        expert_params = 3 * h * spec.moe_intermediate_size
        layers = []
        for i, kind in enumerate(spec.layer_kinds):
            if kind == "moe":
                shared = 3 * h * spec.shared_expert_intermediate_size + (h if spec.shared_expert_gate else 0)
                if spec.num_shared_experts and not spec.shared_expert_intermediate_size:
                    shared = spec.num_shared_experts * expert_params
                gate = h * spec.num_experts + (spec.num_experts if spec.router_bias else 0)
                experts, ep = spec.num_experts, expert_params
            else:
                shared, gate, experts, ep = 3 * h * spec.intermediate_size, 0, 0, 0
            layers.append(LayerCosts(
                index=i, kind=kind,
                attn_bytes=_nbytes(attn_params, wb), norm_bytes=_nbytes(norm_params, wb),
                gate_bytes=_nbytes(gate, wb), expert_bytes=_nbytes(ep, wb), shared_bytes=_nbytes(shared, wb),
                num_experts=experts, top_k=spec.top_k if kind == "moe" else 0,
                kv_bytes_per_token=_nbytes(spec.kv_cache_elems_per_token(i), ab),
                attn_params=attn_params, expert_params=ep, shared_params=shared,
            ))
        embed = _nbytes(spec.vocab_size * h, wb)
        head = 0 if spec.tie_word_embeddings else embed
        head += _nbytes(h, wb)
        if spec.fp8_block and weight_dtype.startswith("float8"):
            layers, embed, head = _fp8_stored_bytes(spec, layers)
        return cls(name=name or spec.model_type, spec=spec, weight_dtype=weight_dtype, act_dtype=act_dtype,
                   layers=tuple(layers), embed_bytes=embed, lm_head_bytes=head)

    @classmethod
    def from_config(cls, config: dict, name: str = "", weight_dtype: str | None = None) -> "ModelCosts":
        spec = ModelSpec.from_config(config)
        return cls.from_spec(spec, weight_dtype=weight_dtype or weight_dtype_of(config), name=name)

    # ---- totals --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def act_bytes(self) -> float:
        return dtype_bytes(self.act_dtype)

    @property
    def device_scale(self) -> float:
        """Device bytes per stored weight byte (1.0 unless ``device_dtype`` differs from ``weight_dtype``)."""
        if self.device_dtype is None:
            return 1.0
        return dtype_bytes(self.device_dtype) / dtype_bytes(self.weight_dtype)

    def device_bytes(self, stored_bytes: int, expert: bool = False) -> int:
        """Device memory of weights that take ``stored_bytes`` on the host / disk (``expert``: routed experts,
        kept as stored on the device when ``experts_as_stored``)."""
        if expert and self.experts_as_stored:
            return int(stored_bytes)
        return int(math.ceil(stored_bytes * self.device_scale))

    def with_expert_bytes(self, expert_bytes: int) -> "ModelCosts":
        """These costs with every routed expert stored in ``expert_bytes`` and kept so on the device (int4
        experts: codes + scales + zero points, computed from directly by the int4 kernels)."""
        layers = tuple(replace(lc, expert_bytes=int(expert_bytes)) if lc.kind == "moe" else lc for lc in self.layers)
        return replace(self, layers=layers, experts_as_stored=True)

    def activation_bytes(self, seqs: int, n: int, q_len: int, kv_len: int, all_logits: bool = False) -> int:
        """Transient device memory of one step of a group of ``seqs`` sequences in ``n`` batches, ``q_len``
        new tokens each over ``kv_len`` keys: hidden states and residuals, the widest FFN workspace (expert
        and MLP calls run in chunks of ``FFN_CHUNK_TOKENS`` tokens), one batch's attention scores and the
        logits. The runtime checks a forward against this same estimate (an upper bound: CPU mode cannot
        measure its allocations, see ``klotski.runtime``)."""
        spec, size = self.spec, self.act_bytes
        T, H = seqs * q_len, spec.hidden_size
        mb = -(-seqs // max(1, min(n, seqs)))
        attn = (mb * spec.num_heads * q_len * kv_len * 4 * 2
                + mb * q_len * spec.num_heads * max(spec.q_head_dim, 1) * size * 4)
        logits = seqs * (q_len if all_logits else 1) * spec.vocab_size * 4
        return int(T * H * (6 * size + 8) + self.ffn_workspace_bytes(T) + attn + logits)

    def ffn_workspace_bytes(self, tokens: int) -> int:
        """The widest FFN workspace of a call over ``tokens`` tokens, run in chunks of ``FFN_CHUNK_TOKENS``:
        fused_moe's per-pair intermediate [I] and fp32 output [H] rows (``klotski.triton_kernels.workspace_bytes``),
        or a dense / shared MLP's gate and up projections [2 x width]."""
        spec, size = self.spec, self.act_bytes
        chunk = min(tokens, FFN_CHUNK_TOKENS)
        moe = chunk * spec.top_k * (spec.moe_intermediate_size * size + spec.hidden_size * 4) if spec.moe_layers else 0
        dense = spec.intermediate_size if len(spec.moe_layers) < spec.num_layers else 0
        mlp = chunk * 2 * max(dense, spec.shared_expert_intermediate_size) * size
        return int(max(moe, mlp))

    @property
    def total_bytes(self) -> int:
        return self.embed_bytes + self.lm_head_bytes + sum(layer.weight_bytes for layer in self.layers)

    def hidden_bytes(self, tokens: int) -> int:
        """Bytes of the hidden states of ``tokens`` tokens: [tokens, hidden_size] in the activation dtype."""
        return _nbytes(tokens * self.spec.hidden_size, self.act_bytes)

    def residual_bytes(self, layer: int, tokens: int) -> int:
        """Bytes the MLP's closing op moves besides weights for ``tokens`` tokens: the hidden rows read and
        written back (the residual add) and, on a MoE layer, the routed experts' fp32 output [tokens, H] read."""
        routed = tokens * self.spec.hidden_size * 4 if self.layers[layer].kind == "moe" else 0
        return 2 * self.hidden_bytes(tokens) + routed

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV cache of ``tokens`` tokens over all layers."""
        return sum(layer.kv_bytes_per_token for layer in self.layers) * tokens

    # ---- FLOPs ---------------------------------------------------------------------------------------
    def attn_flops(self, layer: int, seqs: int, q_len: int, past_len: int) -> tuple[float, float, int]:
        """Attention of ``seqs`` sequences, ``q_len`` new tokens each over ``past_len`` cached ones.

        Returns ``(projection FLOPs, score FLOPs (QK^T + PV, causal), KV-cache bytes read)``.
        MLA prefill uses the expanded form; MLA decode the absorbed form over the latent cache.
        """
        spec, lc = self.spec, self.layers[layer]
        tokens = seqs * q_len
        proj = 2.0 * tokens * lc.attn_params
        kv_avg = past_len + (q_len + 1) / 2.0  # causal: token i attends to past + i + 1 keys
        if spec.attention == "mla":
            if q_len == 1:  # absorbed: q_nope @ W_uk over the latent, PV over the latent then W_uv
                per_key = spec.num_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)
                proj += 2.0 * tokens * spec.num_heads * spec.qk_nope_head_dim * spec.kv_lora_rank
                proj += 2.0 * tokens * spec.num_heads * spec.kv_lora_rank * spec.v_head_dim
            else:
                per_key = spec.num_heads * (spec.q_head_dim + spec.v_head_dim)
        else:
            per_key = spec.num_heads * 2 * spec.head_dim
        score = 2.0 * tokens * kv_avg * per_key
        kv_read = seqs * (past_len + q_len) * lc.kv_bytes_per_token
        return proj, score, kv_read

    def attn_host_split(self, layer: int, tokens: int) -> tuple[float, int, int, int]:
        """Attention split for the host (CPU attention over a KV cache in host memory): the device computes
        Q/K/V, the host the scores over its KV, the device the output projection. Returns ``(output-side
        FLOPs, output-side weight bytes, bytes to the host, bytes back)`` for ``tokens`` new tokens: the
        output projection (MLA: the absorbed W_uv too); Q/K/V (MLA: the absorbed query, latent and rope key)
        and the attention output (MLA: the latent-space output) in the activation dtype."""
        spec, lc = self.spec, self.layers[layer]
        if spec.attention == "mla":
            h, r, dr, dv = spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.v_head_dim
            out_params = h * dv * spec.hidden_size
            out_flops = 2.0 * tokens * (out_params + h * r * dv)
            up, down = tokens * (h * (r + dr) + r + dr), tokens * h * r
        else:
            q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            out_params = q * spec.hidden_size
            out_flops = 2.0 * tokens * out_params
            up, down = tokens * (q + 2 * kv), tokens * q
        out_bytes = int(lc.attn_bytes * out_params / max(lc.attn_params, 1))
        return out_flops, out_bytes, _nbytes(up, self.act_bytes), _nbytes(down, self.act_bytes)

    def gate_flops(self, layer: int, tokens: int) -> float:
        return 2.0 * tokens * self.spec.hidden_size * self.layers[layer].num_experts

    def expert_flops(self, layer: int, tokens: int) -> float:
        return 2.0 * tokens * self.layers[layer].expert_params

    def shared_flops(self, layer: int, tokens: int) -> float:
        return 2.0 * tokens * self.layers[layer].shared_params

    def lm_head_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.spec.hidden_size * self.spec.vocab_size


FFN_CHUNK_TOKENS = 16384  # tokens per expert / MLP call chunk: klotski.triton_kernels.CHUNK_TOKENS


def _nbytes(params: float, bytes_per: float) -> int:
    return int(math.ceil(params * bytes_per))


def _fp8_stored_bytes(spec: ModelSpec, layers: list[LayerCosts]) -> tuple[list[LayerCosts], int, int]:
    """Stored bytes of an fp8 block-scaled checkpoint (DeepSeek-V3): every 2-D linear weight but the router
    takes 1 byte per parameter plus 4 bytes per (b0 x b1) block scale (partial edge blocks included); norms,
    biases, the router (and V3's fp32 e_score_correction_bias), embeddings and LM head stay in the config's
    ``torch_dtype``. -> (layers, embed_bytes, lm_head_bytes incl. the final norm).

    The device keeps every weight in the compute dtype; :meth:`ModelCosts.device_bytes` scales stored bytes
    by compute / 1 byte, which is exact for fp8 matrices (up to the scales) and over-counts the few
    unquantized tensors (embeddings, norms, router): a conservative bound, never an under-estimate.
    """
    from klotski.model.names import ExpertLayout, layer_sources
    from klotski.model.fp8_blocks import scale_shape

    ub = dtype_bytes(spec.torch_dtype) if spec.torch_dtype in DTYPE_BYTES else 2.0
    block = spec.fp8_block

    def matrix(shape) -> int:
        return math.prod(shape) + 4 * math.prod(scale_shape(shape, block))

    layout = ExpertLayout("mlp", False, ("gate_proj", "up_proj", "down_proj"))
    out = []
    for lc in layers:
        by_class = {"attn": 0, "norm": 0, "gate": 0, "shared": 0}
        for key, src in layer_sources(spec, lc.index, layout).items():
            cls = ("norm" if key in ("input_norm", "post_attn_norm") else
                   "gate" if key.startswith("router") else
                   "shared" if key.startswith(("shared_", "dense_")) else "attn")
            for shape in src.shapes:
                if key == "router_bias":
                    by_class[cls] += 4 * math.prod(shape)  # fp32 in V3 checkpoints
                elif len(shape) == 2 and key not in ("router", "shared_gate"):
                    by_class[cls] += matrix(shape)
                else:
                    by_class[cls] += _nbytes(math.prod(shape), ub)
        I, H = spec.moe_intermediate_size, spec.hidden_size
        expert = 2 * matrix((I, H)) + matrix((H, I)) if lc.kind == "moe" else 0
        out.append(replace(lc, attn_bytes=by_class["attn"], norm_bytes=by_class["norm"], gate_bytes=by_class["gate"],
                           expert_bytes=expert, shared_bytes=by_class["shared"]))
    embed = _nbytes(spec.vocab_size * spec.hidden_size, ub)
    head = (0 if spec.tie_word_embeddings else embed) + _nbytes(spec.hidden_size, ub)
    return out, embed, head


def _attn_params(spec: ModelSpec) -> int:
    h = spec.hidden_size
    if spec.attention == "mla":
        heads, qhd = spec.num_heads, spec.q_head_dim
        if spec.q_lora_rank:
            q = h * spec.q_lora_rank + spec.q_lora_rank + spec.q_lora_rank * heads * qhd
        else:
            q = h * heads * qhd
        kv = h * (spec.kv_lora_rank + spec.qk_rope_head_dim) + spec.kv_lora_rank
        kv += spec.kv_lora_rank * heads * (spec.qk_nope_head_dim + spec.v_head_dim)
        return q + kv + heads * spec.v_head_dim * h
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    params = h * (q + 2 * kv) + q * h
    if spec.attention_bias:
        params += q + 2 * kv
    if spec.qk_norm == "head":
        params += 2 * spec.head_dim
    elif spec.qk_norm == "full":
        params += q + kv
    return params


# ---- seconds per op ----------------------------------------------------------------------------------

def op_seconds(op, hw, dtype: str = "bfloat16", contended: float | None = None) -> float:
    """Seconds ``op`` (a :class:`~klotski.schedule.Op`) takes on ``hw`` (a HardwareProfile).

    Compute ops: ``max(flops / matmul rate + score_flops / attention rate, bytes / memory bandwidth)`` plus
    one launch overhead per kernel call on the op's device; where a calibration fitted the op's kind its own
    costs (``kind_costs``), that kind's seconds per call and per token instead, which in CPU mode grow by
    ``hw.contention`` times the share of the op's time another lane ran beside it (``op.contended``, or
    ``contended`` when given; lanes there share the cores, :func:`klotski.calibration.fit_kind_costs`; the
    generic overhead is the calibration run's average). Copies: latency + bytes / bandwidth of the op's link
    (``h2d``, ``d2h``, ``disk``). ``release`` ops take no time.
    """
    return op_timer(hw, dtype)(op, contended)


def op_timer(hw, dtype: str = "bfloat16"):
    """:func:`op_seconds` on ``hw`` as a function of the op alone, the profile's rates looked up once (the
    simulator times millions of ops per planner search); ``timer(op, contended)`` prices it with that share of
    its time beside another lane (default ``op.contended``)."""
    links = {"h2d": hw.h2d_bandwidth, "d2h": hw.d2h_bandwidth, "disk": hw.disk_bandwidth}
    latency = hw.transfer_latency_s
    contention = hw.contention if hw.device == "cpu" else 0.0
    rates: dict[str, tuple] = {}  # device -> (matmul FLOP/s, attention FLOP/s, memory bandwidth, launch overhead)

    def seconds(op, contended: float | None = None) -> float:
        if op.duration is not None:
            return op.duration
        if op.kind == "release":
            return 0.0
        if op.link is not None:
            if op.bytes == 0:
                return 0.0
            return latency + op.bytes / links[op.link]
        device = "cpu" if op.device == "cpu" else "gpu"
        r = rates.get(device)
        if r is None:  # looked up on the first compute op (a profile without matmul rates times copies)
            on_cpu = device == "cpu"
            r = rates[device] = (hw.matmul_rate(dtype, device),
                                 hw.cpu_attention_flops if on_cpu else hw.attention_flops,
                                 hw.cpu_mem_bandwidth if on_cpu else hw.device_mem_bandwidth,
                                 hw.cpu_op_overhead_s if on_cpu else hw.op_overhead_s,
                                 hw.cpu_kind_costs if on_cpu else hw.kind_costs)
        rate, attn_rate, mem_bw, overhead, by_kind = r
        work = max(op.flops / rate + op.score_flops / attn_rate, op.bytes / mem_bw)
        own = by_kind.get(op.kind) if by_kind else None
        if own is None:
            return work + overhead * max(1, op.calls)
        fixed = own[0] * max(1, op.calls) + own[1] * op.tokens
        if contention:
            fixed *= 1.0 + contention * (op.contended if contended is None else contended)
        return work + fixed

    return seconds
