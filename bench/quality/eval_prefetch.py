"""How well is the next MoE layer's expert set predicted? Correlation table vs gate lookahead vs their
per-layer combination, on the trained tiny MoE over held-out text.

The model (klotski's own resident layers, fp32 on CPU) runs over windows of the held-out validation split of
``train_tiny_moe.py``'s corpus, recording for every layer the residual stream entering its MLP [T, H] and its
routing [T, k] (windows spread evenly over the text). The correlation table is first learned from
training-split text (the runtime's warm-up pass), then every source predicts each MoE layer after the first from the previous layer,
online (the table keeps learning; the combination picks per layer the source measured better so far):

* per token, budget k (= top_k): recall = precision = |predicted & used| / k;
* per batch group of 16 consecutive tokens, budget 2k: precision = |P & A| / |P|, recall = |P & A| / |A|
  with A the distinct experts the group used.

``popularity`` (the table without context) is shown as a floor. ``lookahead`` and ``combined`` use the
residual stream entering the previous layer's MLP (there when its gate runs, so the prefetch overlaps that
layer's experts and the next attention); ``lookahead_out`` / ``combined_out`` use the previous layer's
output instead (there only after its experts ran: more accurate, less time to hide the load).

    python bench/quality/eval_prefetch.py --model klotski/assets/tiny_moe

Prints a table and writes JSON to ``bench/results/<date>-prefetch-eval.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_tiny_moe import encode_stream, split_corpus  # noqa: E402

from klotski.checkpoint import SafetensorsIndex  # noqa: E402
from klotski.lookahead import ExpertPredictor, GateLookahead, HitCounts, rank_experts  # noqa: E402
from klotski.model.decoder import attention_step, mlp_step  # noqa: E402
from klotski.model.layers import rms_norm  # noqa: E402
from klotski.model.resident import ResidentModel  # noqa: E402
from klotski.model.router import route  # noqa: E402
from klotski.model.spec import ModelSpec  # noqa: E402
from klotski.model.weights import CheckpointWeights  # noqa: E402
from klotski.prefetch import CorrelationPrefetcher  # noqa: E402
from klotski.tokenizer import Tokenizer  # noqa: E402

SOURCES = ("popularity", "table", "lookahead", "combined", "lookahead_out", "combined_out")


@torch.inference_mode()
def trace_window(model: ResidentModel, ids: list[int]) -> dict[str, list[torch.Tensor]]:
    """One window of token ids -> per layer: ``resid`` (residual rows entering the MLP [T, H]), ``out``
    (the layer's output rows [T, H]) and ``ids`` (topk_ids [T, k])."""
    spec = model.spec
    x = F.embedding(torch.tensor([ids]), model.embed)
    S = x.shape[1]
    cache = model.new_cache(1, S, torch.zeros(1, dtype=torch.int64))
    mask, positions = cache.key_mask(S, model.device), cache.positions(S, model.device)
    rec = {"resid": [], "out": [], "ids": []}
    for i, w in enumerate(model.layers):
        x = attention_step(spec, w, x, cache, i, model.rotary, mask, positions)
        rec["resid"].append(x[0].clone())
        rec["ids"].append(route(spec, w, rms_norm(x[0], w["post_attn_norm"], spec.rms_norm_eps))[1])
        x = mlp_step(spec, w, x, i, None, model.experts_fn)
        rec["out"].append(x[0].clone())
    return rec


def trace(model: ResidentModel, stream: torch.Tensor, tokens: int, seq_len: int, bos: int):
    """Windows of ``<s>`` + seq_len - 1 tokens, ``tokens`` tokens in all, spread evenly over the stream
    -> {"resid", "out", "ids"}: per layer, the windows' rows concatenated (the ``<s>`` rows left out)."""
    step = seq_len - 1
    windows = max(1, min(tokens, stream.numel()) // step)
    stride = max(step, (stream.numel() - step) // windows)
    parts = {k: [[] for _ in model.layers] for k in ("resid", "out", "ids")}
    for s in range(0, windows * stride, stride):
        rec = trace_window(model, [bos] + stream[s: s + step].tolist())
        for k, per_layer in rec.items():
            for i, t in enumerate(per_layer):
                parts[k][i].append(t[1:])
    return {k: [torch.cat(t) for t in v] for k, v in parts.items()}


def evaluate(spec: ModelSpec, look: GateLookahead, warm, held, group: int, budget: int) -> dict:
    """Online next-layer prediction over the ``held`` trace in groups of ``group`` tokens.

    ``lookahead``/``combined`` predict from the residual entering the previous layer's MLP (available when
    its gate runs); ``*_out`` from the previous layer's output (available only after its experts)."""
    def warmed() -> CorrelationPrefetcher:
        table = CorrelationPrefetcher(spec.num_layers, spec.num_experts)
        for layer in spec.moe_layers:
            table.record(layer, warm["ids"][layer])
        return table

    table = warmed()
    predictor = ExpertPredictor(spec, table, look)
    after = ExpertPredictor(spec, warmed(), look)
    moe = spec.moe_layers
    counts = {"popularity": {m: HitCounts() for m in moe}}
    ids = held["ids"]
    for g in range(0, ids[moe[0]].shape[0] - group + 1, group):
        rows = slice(g, g + group)
        for p in (predictor, after):
            p.reset_sequence()
            p.observe(moe[0], ids[moe[0]][rows])
        for prev, layer in zip(moe, moe[1:]):
            pop = rank_experts(table.scores(layer, None))[:budget]
            predictor.predict_next(prev, held["resid"][prev][rows], ids[prev][rows], budget)
            after.predict_next(prev, held["out"][prev][rows], ids[prev][rows], budget)
            truth = ids[layer][rows]
            predictor.observe(layer, truth)
            after.observe(layer, truth)
            counts["popularity"][layer].add(pop, set(truth.reshape(-1).tolist()))
    counts["table"] = {m: predictor.counts[m]["table"] for m in moe}
    counts["lookahead"] = {m: predictor.counts[m]["lookahead"] for m in moe}
    counts["combined"] = {m: predictor.counts[m]["chosen"] for m in moe}
    counts["lookahead_out"] = {m: after.counts[m]["lookahead"] for m in moe}
    counts["combined_out"] = {m: after.counts[m]["chosen"] for m in moe}
    out = {}
    for name in SOURCES:
        cs = [counts[name][m] for m in moe[1:]]
        hits = sum(c.hits for c in cs)
        out[name] = {"precision": hits / max(1, sum(c.predicted for c in cs)),
                     "recall": hits / max(1, sum(c.used for c in cs)),
                     "per_layer": {m: {"precision": counts[name][m].precision, "recall": counts[name][m].recall,
                                       "predictions": counts[name][m].predictions} for m in moe[1:]}}
    out["combined"]["sources"] = {m: predictor.source(m) for m in moe[1:]}
    out["combined_out"]["sources"] = {m: after.source(m) for m in moe[1:]}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="klotski/assets/tiny_moe")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens evaluated")
    p.add_argument("--warmup-tokens", type=int, default=16384, help="training tokens the table learns first")
    p.add_argument("--group", type=int, default=16, help="tokens per batch group")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="default: bench/results/<date>-prefetch-eval.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    report = json.loads((Path(args.model) / "train_report.json").read_text())
    targs = report["args"]
    spec = ModelSpec.from_pretrained(args.model)
    weights = CheckpointWeights(SafetensorsIndex(args.model), spec)
    model = ResidentModel(weights, torch.device("cpu"), torch.float32)
    look = GateLookahead.from_weights(weights)
    root = Path(report["corpus"]["root"])
    train_texts, val_texts, corpus = split_corpus(root, targs["val_fraction"], targs["train_chars"])
    if corpus["sha256"] != report["corpus"]["sha256"]:
        print(f"warning: corpus under {root} differs from the one the model was trained on", file=sys.stderr)
    tok = Tokenizer(args.model)._tok
    bos = spec.bos_token_id if spec.bos_token_id is not None else 0
    seq = targs["seq_len"]
    warm = trace(model, encode_stream(tok, train_texts), args.warmup_tokens, seq, bos)
    held = trace(model, encode_stream(tok, val_texts), args.tokens, seq, bos)
    k = spec.top_k
    results = {"per_token": evaluate(spec, look, warm, held, 1, k),
               f"per_group_{args.group}": evaluate(spec, look, warm, held, args.group, 2 * k)}
    n = held["ids"][0].shape[0]
    print(f"model {args.model}: {spec.num_layers} layers x {spec.num_experts} experts, top-{k}; "
          f"{n} held-out tokens, table warmed on {warm['ids'][0].shape[0]} training tokens ({time.time() - t0:.0f}s)")
    print(f"{'source':<13} {'token@k recall':>15} {'group@2k prec':>14} {'group@2k recall':>16}")
    grp = results[f"per_group_{args.group}"]
    for name in SOURCES:
        print(f"{name:<13} {results['per_token'][name]['recall']:>15.3f} {grp[name]['precision']:>14.3f} "
              f"{grp[name]['recall']:>16.3f}")
    for mode, res in results.items():
        print(f"{mode} per layer (recall): " + "; ".join(
            f"L{m} " + " ".join(f"{s} {res[s]['per_layer'][m]['recall']:.2f}" for s in SOURCES[1:4])
            + f" -> {res['combined']['sources'][m]}" for m in spec.moe_layers[1:]))
    out = args.json or os.path.join(os.path.dirname(__file__), "..", "results",
                                    f"{time.strftime('%Y%m%d')}-prefetch-eval.json")
    payload = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "model": args.model, "held_out_tokens": n, "warmup_tokens": warm["ids"][0].shape[0], "top_k": k,
               "group": args.group, "corpus": corpus, "results": results}
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, out)
    print(f"wrote {os.path.normpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
