"""bench/quality/eval_prefetch.py measures prediction against the model's real routing."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "quality"))

from eval_prefetch import evaluate, trace_window  # noqa: E402

from klotski.checkpoint import SafetensorsIndex  # noqa: E402
from klotski.lookahead import GateLookahead  # noqa: E402
from klotski.model.resident import ResidentModel  # noqa: E402
from klotski.model.spec import ModelSpec  # noqa: E402
from klotski.model.weights import CheckpointWeights  # noqa: E402


def test_trace_routing_is_transformers_routing_and_evaluate_counts_every_prediction(checkpoints):
    path, hf = checkpoints.get("mixtral")
    spec = ModelSpec.from_pretrained(path)
    weights = CheckpointWeights(SafetensorsIndex(path), spec)
    model = ResidentModel(weights, torch.device("cpu"), torch.float32)
    ids = [int(t) for t in torch.arange(5, 45) % 128]
    rec = trace_window(model, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_router_logits=True).router_logits
    for layer in range(spec.num_layers):
        assert [set(r) for r in rec["ids"][layer].tolist()] == \
            [set(r) for r in ref[layer].topk(spec.top_k, dim=-1).indices.tolist()]
    trace = {k: [t[1:] for t in v] for k, v in rec.items()}
    res = evaluate(spec, GateLookahead.from_weights(weights), trace, trace, group=1, budget=spec.top_k)
    per_layer = res["table"]["per_layer"][1]
    assert per_layer["predictions"] == len(ids) - 1
    assert 0.0 <= res["lookahead"]["recall"] <= 1.0 and res["combined"]["sources"][1] in ("table", "lookahead")
