"""Tiny random-weight HF checkpoints for tests, built with transformers (the reference we must match).

Weights are re-drawn at ~1/sqrt(fan_in) (transformers' std-0.02 init leaves tiny models dominated by the
embedding path, so a broken MoE could still reproduce greedy tokens) and router logits are sharpened.
"""
from __future__ import annotations

import math
import os

import torch

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(arch: str, **overrides):
    import transformers as tf

    if arch == "mixtral":
        cfg = tf.MixtralConfig(**TINY, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**{**TINY, "num_hidden_layers": 3}, intermediate_size=80, moe_intermediate_size=40,
                                shared_expert_intermediate_size=56, num_experts=6, num_experts_per_tok=2,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1])
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**TINY, head_dim=24, intermediate_size=80, moe_intermediate_size=40, num_experts=8,
                                num_experts_per_tok=3, norm_topk_prob=True)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**TINY, intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False, clip_qkv=None)
    elif arch in ("deepseek_v2", "deepseek_v3"):
        cfg = deepseek_config(arch)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def deepseek_config(arch: str):
    """MLA with q_lora (override ``q_lora_rank=None`` for the plain q projection), YaRN rope, a dense first
    layer, 2 shared experts, grouped routing (override ``n_group=1, topk_group=1`` to turn it off)."""
    import transformers as tf

    mla = dict(kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    moe = dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=24,
               intermediate_size=80, first_k_dense_replace=1, n_group=4, topk_group=2)
    base = {**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4}
    if arch == "deepseek_v2":  # softmax scores, group max; attention factor 1, softmax scale * mscale^2
        yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        return tf.DeepseekV2Config(**base, **mla, **moe, topk_method="group_limited_greedy",
                                   routed_scaling_factor=1.5, norm_topk_prob=False, rope_parameters=yarn)
    # V3: sigmoid scores + e_score_correction_bias, top-2-sum group scores; attention factor != 1
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    return tf.DeepseekV3Config(**base, **mla, **moe, routed_scaling_factor=2.5, norm_topk_prob=True,
                               rope_interleave=True, rope_parameters=yarn)


def sharpen_(model, router_scale: float = 4.0, seed: int = 0) -> None:
    """Re-draw every weight at 1/sqrt(fan_in) (norm weights near 1) and scale router weights up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                continue
            fan_in = p.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            if "embed_tokens" in name:
                std = 1.0
            if name.endswith("gate.weight") and p.shape[0] > 1:  # router
                std *= router_scale
            p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: bias large enough to change choices
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def build(arch: str, path: str, dtype=torch.float32, fused: bool = False, shard_bytes: int | None = None,
          seed: int = 0, **overrides):
    """Build, sharpen and save a tiny model; returns the transformers model (fp32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    sharpen_(model, seed=seed)
    kwargs = {"save_original_format": not fused}
    if shard_bytes:
        kwargs["max_shard_size"] = shard_bytes
    model.to(dtype).save_pretrained(path, **kwargs)
    if dtype == torch.float32:
        return model
    # The reference is what transformers loads from the saved checkpoint (casting the live model back
    # would also round its fp32 buffers, e.g. rotary inv_freq).
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def files(path: str) -> list[str]:
    return sorted(os.listdir(path))


# ---- comparison against transformers, shared by the architecture tests -----------------------------------
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def check_against_transformers(path: str, hf, prompts=PROMPTS, new_tokens: int = 16):
    """fp32 LLM at ``path`` vs transformers model ``hf``: greedy tokens identical, logits within 1e-4 relative."""
    from klotski import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, new_tokens) for p in prompts]
    for ours, prompt in zip(llm.logits(prompts), prompts):
        ref = hf_logits(hf, prompt)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-4
    return llm


def write_tokenizer(model_dir: str, vocab_size: int = 128) -> str:
    """A word-level ``tokenizer.json`` over ``vocab_size`` tokens ("w0" ... and the letters of ASCII text
    mapped to their own ids) so text prompts work on a tiny checkpoint. Returns the file's path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): c for c in range(32, min(127, vocab_size))}
    vocab.update({f"w{i}": i for i in range(vocab_size) if i not in vocab.values()})
    vocab["[UNK]"] = 0 if "[UNK]" not in vocab else vocab["[UNK]"]
    tok = Tokenizer(models.WordLevel({k: v for k, v in vocab.items() if v < vocab_size}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    path = os.path.join(model_dir, "tokenizer.json")
    tok.save(path)
    return path
