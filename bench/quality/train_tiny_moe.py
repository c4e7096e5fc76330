"""Train the tiny Mixtral-layout MoE that serves as Klotski's quality yardstick and demo model.

Every other checkpoint Klotski runs has random weights; this one has learned routing, so prefetch accuracy
and the cost of lossy options can be measured on it, and ``klotski demo`` prints readable text.

Corpus: the ``.py`` files of the running interpreter's standard library (code, comments, docstrings and
``pydoc_data/topics.py``, the language reference as text), present on every machine without a network.
Licence of the corpus: Python Software Foundation License Version 2 (PSF-2.0), "Copyright (c) 2001 Python
Software Foundation; All Rights Reserved"; the checkpoint is a derived work and is distributed under it.
Files are listed in sorted order from the standard library root, skipping test suites, codec tables and
``site-packages``; a file is held out for validation when the first byte of sha256(relative path) is
< ``256 * val_fraction`` (a fixed, path-only split), and training takes ``pydoc_data/topics.py`` (the
language reference as prose) first, then the other files in sha256 order up to ``--train-chars``. The
report records the Python version and a digest of the training corpus so runs on different interpreters
can be told apart.

Model (transformers ``MixtralForCausalLM``): 4 layers, hidden 256, 4 heads / 2 KV heads, 8 experts of
intermediate 224, top-2, a byte-level BPE vocabulary of 2048 trained here with ``tokenizers``; the
auxiliary load-balancing loss (``router_aux_loss_coef``) keeps routing from collapsing. Training is fp32
on CPU; the checkpoint is saved in bf16 (about 15 MB). Deterministic given ``--seed`` and ``--threads``
(batch sampling, init and data order all come from the seed; no time-based stopping).

Threads: on the shared 2-core development machine, with other jobs running, one torch thread trained
4x faster per step than two (3 s vs 12.5 s wall for a 16 x 128-token step: OpenMP threads spin while
descheduled), so ``--threads`` defaults to 1; the step count, not the clock, ends training.

    python bench/quality/train_tiny_moe.py --out klotski/assets/tiny_moe

The shipped run (600 steps) took 18 min of wall time on the busy development machine (1.7-6 s per step
depending on the load).

``--experts``, ``--intermediate`` and ``--top-k`` (``num_experts_per_tok``) make a wider MoE with the same active
expert parameters per token, e.g. 32 experts of intermediate 112, top-4 (the expert-selection measurements on
many experts; not shipped, written outside the repository):

    python bench/quality/train_tiny_moe.py --out /work/models/tiny_moe_e32 --experts 32 --top-k 4 --intermediate 112

or 64 experts of intermediate 56, top-8 (the routing shape of OLMoE, Qwen3-MoE and DeepSeek-V3: eight experts per
token; 444 s, validation perplexity 80.7):

    python bench/quality/train_tiny_moe.py --out /work/models/tiny_moe_e64 --experts 64 --top-k 8 --intermediate 56

Writes ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``generation_config.json`` and
``train_report.json`` (validation perplexity vs the unigram baseline, per-layer expert-load entropy,
greedy samples, the command) into ``--out``, atomically (temporary directory + rename).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}
BOS, EOS = "<s>", "</s>"
SAMPLE_PROMPTS = ["def __init__(self", "The return value is", "import os\nimport sys\n", "class Parser:\n"]


def stdlib_files(root: Path) -> list[Path]:
    """Sorted ``.py`` files under the standard library, without test suites, site-packages, codec tables."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append(p)
    return out


def split_corpus(root: Path, val_fraction: float, train_chars: int) -> tuple[list[str], list[str], dict]:
    """(train texts, validation texts, corpus info). A file is validation when the first byte of
    sha256(relative path) < 256 * val_fraction; training takes ``pydoc_data/topics.py`` (the language
    reference as prose) first, then the other files in sha256 order until ``train_chars``."""
    cut = int(256 * val_fraction)
    keyed = []
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        keyed.append((hashlib.sha256(rel.encode()).digest(), rel, p))
    val = [p.read_text(encoding="utf-8", errors="replace") for h, _, p in keyed if h[0] < cut]
    order = sorted((rel != "pydoc_data/topics.py", h, rel, p) for h, rel, p in keyed if h[0] >= cut)
    train, digest, size = [], hashlib.sha256(), 0
    for _, _, rel, p in order:
        if size >= train_chars:
            break
        text = p.read_text(encoding="utf-8", errors="replace")
        train.append(text)
        size += len(text)
        digest.update(rel.encode() + b"\0" + text.encode("utf-8", "surrogatepass"))
    if not train or not val:
        raise RuntimeError(f"corpus split is empty under {root}: {len(train)} train / {len(val)} validation files")
    info = {"root": str(root), "python": platform.python_version(), "licence": "PSF-2.0",
            "train_files": len(train), "val_files": len(val), "train_chars": sum(map(len, train)),
            "val_chars": sum(map(len, val)), "sha256": digest.hexdigest()}
    return train, val, info


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with ``<s>`` (id 0, prepended by the post-processor) and ``</s>`` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """All files' ids, each file followed by ``</s>`` (int64 [N])."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(1)
    return torch.tensor(ids, dtype=torch.int64)


def model_config(vocab_size: int, args):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef, router_jitter_noise=0.0,
        initializer_range=0.02,
    )


def batch(stream: torch.Tensor, g: torch.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
    """[B, seq_len] windows: ``<s>`` then seq_len - 1 tokens from random offsets of the stream."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=g)
    rows = torch.stack([stream[s: s + seq_len - 1] for s in starts.tolist()])
    return torch.cat([torch.zeros(batch_size, 1, dtype=torch.int64), rows], dim=1)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, train_counts: torch.Tensor, seq_len: int, max_tokens: int) -> dict:
    """Validation perplexity (non-overlapping windows), the unigram baseline's, per-layer load entropy."""
    model.eval()
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    nll, n = 0.0, 0
    loads = torch.zeros(model.config.num_hidden_layers, E, dtype=torch.float64)
    step = seq_len - 1
    for s in range(0, min(val.numel(), max_tokens) - step, step):
        x = torch.cat([torch.zeros(1, dtype=torch.int64), val[s: s + step]])[None]
        out = model(x, output_router_logits=True)
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        n += step
        for layer, logits in enumerate(out.router_logits):
            ids = logits.topk(k, dim=-1).indices.reshape(-1)
            loads[layer] += torch.bincount(ids, minlength=E).double()
    p_uni = (train_counts.double() + 1) / (train_counts.sum() + train_counts.numel())
    uni_nll = -torch.log(p_uni[val[:n]]).sum().item()  # the same n tokens the model predicted
    probs = loads / loads.sum(1, keepdim=True)
    entropy = -(probs * torch.log2(probs.clamp_min(1e-12))).sum(1)
    return {"val_tokens": n, "val_ppl": math.exp(nll / n), "unigram_ppl": math.exp(uni_nll / n),
            "val_nll": nll / n, "expert_load": probs.tolist(),
            "load_entropy_bits": entropy.tolist(), "max_entropy_bits": math.log2(E)}


def samples(model, tok, max_new_tokens: int = 40) -> list[dict]:
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
        out.append({"prompt": prompt, "continuation": tok.decode(gen[0, ids.shape[1]:].tolist())})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="klotski/assets/tiny_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=224)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="experts per token (num_experts_per_tok)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--train-chars", type=int, default=4_000_000, help="training corpus size (characters)")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        raise SystemExit(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import MixtralForCausalLM

    t0 = time.time()
    root = Path(sysconfig.get_paths()["stdlib"])
    train_texts, val_texts, corpus = split_corpus(root, args.val_fraction, args.train_chars)
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_ids, val_ids = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    V = tok.get_vocab_size()
    print(f"corpus: {corpus['train_files']} train / {corpus['val_files']} val files, {train_ids.numel()} / "
          f"{val_ids.numel()} tokens, vocab {V} ({time.time() - t0:.0f}s)", flush=True)

    model = MixtralForCausalLM(model_config(V, args))
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = batch(train_ids, g, args.batch_size, args.seq_len)
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"lr {lr_at(step, args):.2e}  {(time.time() - t1) / (step + 1):.2f}s/step", flush=True)
    train_s = time.time() - t1

    with torch.no_grad():  # evaluate what is shipped: bf16-rounded weights (fp32 arithmetic, as klotski on CPU)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    metrics = evaluate(model, val_ids, torch.bincount(train_ids, minlength=V), args.seq_len, args.eval_tokens)
    metrics["samples"] = samples(model, tok)
    report = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "args": vars(args), "corpus": corpus, "parameters": nparams, "train_seconds": round(train_s, 1),
              "train_tokens": args.steps * args.batch_size * args.seq_len, "torch": torch.__version__,
              **metrics}
    print(f"val ppl {metrics['val_ppl']:.2f} vs unigram {metrics['unigram_ppl']:.2f}; load entropy (bits, max "
          f"{metrics['max_entropy_bits']:.0f}): " + ", ".join(f"{e:.2f}" for e in metrics["load_entropy_bits"]))
    for s in metrics["samples"]:
        print(f"{s['prompt']!r} -> {s['continuation']!r}")

    out_dir = Path(args.out).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.config.output_router_logits = False
        model.generation_config.pad_token_id = 1
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
        for f in tmp.iterdir():  # package data: readable by everyone (mkdtemp and safetensors make 0700/0600)
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20:.1f} MiB) "
          f"in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
