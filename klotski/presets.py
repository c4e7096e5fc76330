"""Built-in model configs: the public ``config.json`` values of well-known MoE models, as plain dicts.

They let ``klotski plan --preset NAME`` plan a model that has not been downloaded. Each entry is parsed by
:meth:`klotski.model.ModelSpec.from_config` exactly like a downloaded checkpoint's config (one parser).
Only fields a parser reads (plus ``torch_dtype`` / ``quantization_config``) are kept.
Hardware presets live in :mod:`klotski.hardware`.
"""
from __future__ import annotations

import copy

MODEL_CONFIGS: dict[str, dict] = {
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": None, "torch_dtype": "bfloat16",
    },
    "mixtral-8x22b": {  # mistralai/Mixtral-8x22B-v0.1
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 6144, "intermediate_size": 16384,
        "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": None, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "attention_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "qwen1.5-moe-a2.7b": {  # Qwen/Qwen1.5-MoE-A2.7B
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
        "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {  # allenai/OLMoE-1B-7B-0924
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 50279, "torch_dtype": "bfloat16",
    },
    "deepseek-v2-lite": {  # deepseek-ai/DeepSeek-V2-Lite
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 100000,
        "eos_token_id": 100001, "torch_dtype": "bfloat16",
    },
    "deepseek-v3": {  # deepseek-ai/DeepSeek-V3 (weights stored as fp8 e4m3, 128x128 block scales)
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "noaux_tc",
        "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]},
    },
}

ALIASES = {
    "mixtral-8x7b-v0.1": "mixtral-8x7b", "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mixtral-8x22b-v0.1": "mixtral-8x22b", "mistralai/mixtral-8x22b-v0.1": "mixtral-8x22b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b", "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "allenai/olmoe-1b-7b-0924": "olmoe-1b-7b", "olmoe-1b-7b-0924": "olmoe-1b-7b",
    "deepseek-ai/deepseek-v2-lite": "deepseek-v2-lite", "deepseek-ai/deepseek-v3": "deepseek-v3",
}


def model_config(name: str) -> dict:
    """A copy of the built-in ``config.json`` dict for ``name`` (case-insensitive; HF repo ids accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODEL_CONFIGS:
        raise KeyError(f"unknown model preset {name!r}; built-in: {', '.join(MODEL_CONFIGS)}")
    return copy.deepcopy(MODEL_CONFIGS[key])
