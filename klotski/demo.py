"""The built-in demo model: a synthetic Mixtral-architecture checkpoint with random weights and a byte-level
tokenizer, written once to the user cache (no download). Weights are drawn at 1/sqrt(fan_in) so every layer
matters; the text it writes is, of course, noise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch

# name -> (hidden, intermediate, layers, heads, kv_heads, experts, top_k)
SIZES = {
    "default": (512, 1408, 8, 8, 4, 8, 2),  # ~138M params, ~280 MB in bf16
    "tiny": (64, 96, 2, 4, 2, 4, 2),  # for tests
}
VOCAB = 320  # 256 byte tokens + <s>, </s>, padding to a multiple of 64
FORMAT_VERSION = 1


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "klotski")


def demo_model_dir(size: str = "default") -> str:
    return os.path.join(cache_dir(), f"demo-mixtral-{size}-v{FORMAT_VERSION}")


def write_byte_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tok.save(path)


def demo_config(size: str) -> dict:
    hidden, inter, layers, heads, kv_heads, experts, top_k = SIZES[size]
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "bfloat16",
    }


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert Mixtral keys, bf16, std 1/sqrt(fan_in); router weights sharpened."""
    g = torch.Generator().manual_seed(seed)
    H, I, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    D = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * D
    V = config["vocab_size"]

    def mat(rows, cols, scale=1.0):
        return (torch.randn(rows, cols, generator=g) * (scale / math.sqrt(cols))).to(torch.bfloat16)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": (torch.randn(V, H, generator=g)).to(torch.bfloat16),
         "model.norm.weight": norm(H), "lm_head.weight": mat(V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(H)
        t[f"{p}.post_attention_layernorm.weight"] = norm(H)
        t[f"{p}.self_attn.q_proj.weight"] = mat(H, H)
        t[f"{p}.self_attn.k_proj.weight"] = mat(kv, H)
        t[f"{p}.self_attn.v_proj.weight"] = mat(kv, H)
        t[f"{p}.self_attn.o_proj.weight"] = mat(H, H)
        t[f"{p}.block_sparse_moe.gate.weight"] = mat(E, H, scale=4.0)
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"], t[f"{q}.w3.weight"], t[f"{q}.w2.weight"] = mat(I, H), mat(I, H), mat(H, I)
    return t


def build_demo_checkpoint(path: str, size: str = "default", seed: int = 0) -> str:
    """Write the demo checkpoint to ``path`` atomically (temp dir + rename); returns ``path``."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        config = demo_config(size)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(random_weights(config, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_byte_tokenizer(os.path.join(tmp, "tokenizer.json"))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def ensure_demo_checkpoint(size: str = "default", path: str | None = None) -> str:
    path = path or demo_model_dir(size)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        if os.path.exists(path):
            shutil.rmtree(path)
        build_demo_checkpoint(path, size)
    return path
