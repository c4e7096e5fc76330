"""The built-in demo models, prepared once in the user cache (no download).

* ``default``: the trained tiny MoE shipped with the package in ``klotski/assets/tiny_moe`` (Mixtral layout,
  4 layers, 8 experts, top-2, a 2048-token byte-level BPE; trained on the Python standard library's source
  by ``bench/quality/train_tiny_moe.py``, PSF licence). It is copied into the cache (its packed store and
  prefetch table are written beside it there, never into the installed package) and writes readable text.
* ``tiny``: a synthetic Mixtral-architecture checkpoint with random weights (std 1/sqrt(fan_in), router
  sharpened) and a byte-level tokenizer, built in a second; for tests. Its text is noise.

Preparation is crash-safe: a model is written into a uniquely named temporary directory beside its final
place (``.<name>.tmp-<pid>-<random>``) and renamed into place only when complete, so an interrupted or
killed run never leaves a directory that looks finished. Temporaries whose process is gone (and, from
earlier versions, ``.demo-*`` directories older than an hour) are removed by the next preparation in the
same cache directory; a running preparation's temporary is left alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time

# name -> (hidden, intermediate, layers, heads, kv_heads, experts, top_k) of the synthetic models
SIZES = {
    "tiny": (64, 96, 2, 4, 2, 4, 2),  # for tests
}
DEMO_SIZES = ("default", *SIZES)
VOCAB = 320  # synthetic models: 256 byte tokens + <s>, </s>, padding to a multiple of 64
FORMAT_VERSION = 2
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_moe")
ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_report.json")
TRAIN_COMMAND = "python bench/quality/train_tiny_moe.py --out klotski/assets/tiny_moe"
SOURCE_FILE = "demo_source.json"  # in a cached copy: which shipped weights it was copied from
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_LEGACY_TMP = re.compile(r"^\.demo-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".demo-") of version 1
LEGACY_STALE_S = 3600.0


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "klotski")


def demo_model_dir(size: str = "default") -> str:
    name = "tiny-moe" if size == "default" else f"mixtral-{size}"
    return os.path.join(cache_dir(), f"demo-{name}-v{FORMAT_VERSION}")


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


def random_weights(config: dict, seed: int = 0) -> "dict[str, torch.Tensor]":
    """Per-expert Mixtral keys, bf16, std 1/sqrt(fan_in); router weights sharpened."""
    import torch

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(parent: str) -> list[str]:
    """Delete the temporaries of killed preparations in ``parent``; returns the paths removed."""
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        m = _TMP.match(name)
        if m:
            stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        else:
            stale = bool(_LEGACY_TMP.match(name)) and time.time() - os.path.getmtime(path) > LEGACY_STALE_S
        if stale and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _temporary(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    return tmp


def _install(path: str, fill, current=lambda: False) -> str:
    """Run ``fill(tmp_dir)`` in a fresh temporary beside ``path``, then rename it into place (replacing an
    older ``path``, moved aside first, unless ``current()`` says another process has just put a good one
    there). On any error or interrupt the temporary is removed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temporary(path)
    try:
        fill(tmp)
        if current():
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.lexists(path):  # an outdated or incomplete copy: move it aside (onto an empty temporary)
            old = _temporary(path)
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _asset_source() -> dict:
    weights = os.path.join(ASSET_DIR, "model.safetensors")
    missing = [f for f in ASSET_FILES[:3] if not os.path.isfile(os.path.join(ASSET_DIR, f))]
    if missing:
        raise FileNotFoundError(
            f"the trained demo model is not installed: {', '.join(missing)} missing from {ASSET_DIR}; rebuild it "
            f"from a source checkout with `{TRAIN_COMMAND}` (about 15 minutes of one CPU core), or run "
            f"`klotski demo --size tiny` (random weights)")
    return {"asset": ASSET_DIR, "model.safetensors": _sha256(weights)}


def _copy_asset(tmp: str, source: dict) -> None:
    for name in ASSET_FILES:
        src = os.path.join(ASSET_DIR, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(tmp, name))
    if _sha256(os.path.join(tmp, "model.safetensors")) != source["model.safetensors"]:
        raise OSError(f"{ASSET_DIR}/model.safetensors changed while it was being copied")
    with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
        json.dump(source, f)


def _write_random(tmp: str, size: str, seed: int) -> None:
    from safetensors.torch import save_file

    config = demo_config(size)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(random_weights(config, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    write_byte_tokenizer(os.path.join(tmp, "tokenizer.json"))


def build_demo_checkpoint(path: str, size: str = "default", seed: int = 0) -> str:
    """Write demo model ``size`` to ``path`` atomically (temporary directory + rename); returns ``path``.
    If a current model appears at ``path`` meanwhile (another process), that one is kept."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {', '.join(DEMO_SIZES)}")
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    current = lambda: _is_current(path, size)  # noqa: E731
    if size == "default":
        source = _asset_source()
        return _install(path, lambda tmp: _copy_asset(tmp, source), current)
    return _install(path, lambda tmp: _write_random(tmp, size, seed), current)


def _is_current(path: str, size: str) -> bool:
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        return False
    if size != "default":
        return True
    try:
        with open(os.path.join(path, SOURCE_FILE)) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return False
    weights = os.path.join(ASSET_DIR, "model.safetensors")
    return not os.path.isfile(weights) or cached.get("model.safetensors") == _sha256(weights)


def ensure_demo_checkpoint(size: str = "default", path: str | None = None) -> str:
    """The demo model's directory, prepared first if missing, incomplete or (``default``) older than the
    shipped weights; stale temporaries of killed earlier preparations are removed."""
    path = path or demo_model_dir(size)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    if not _is_current(path, size):
        try:
            build_demo_checkpoint(path, size)
        except OSError:
            if not _is_current(path, size):  # else another process finished the same preparation first
                raise
    return path
