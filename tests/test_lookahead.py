import numpy as np
import pytest
import torch

from klotski.checkpoint import SafetensorsIndex
from klotski.lookahead import ExpertPredictor, GateLookahead
from klotski.model.spec import ModelSpec
from klotski.model.weights import CheckpointWeights
from klotski.prefetch import CorrelationPrefetcher


def _hf_model_with_unchanged_residual(arch: str, path):
    """A tiny model whose layer-0 experts and layer-1 attention add nothing to the residual stream, so layer
    1's router sees exactly the residual stream that entered layer 0's MLP."""
    import transformers as tf

    import hf_models

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(hf_models.tiny_config(arch)).eval()
    hf_models.sharpen_(model, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.startswith("model.layers.0.mlp.experts") and "down_proj" in name) or \
                    name == "model.layers.1.self_attn.o_proj.weight":
                p.zero_()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_lookahead_is_exact_when_the_next_router_sees_the_same_hidden_state(arch, tmp_path):
    model = _hf_model_with_unchanged_residual(arch, tmp_path)
    captured = {}
    model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("resid", args[0][0].detach().clone()))
    ids = torch.arange(3, 40).reshape(1, -1) % 128
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    truth = out.router_logits[1].topk(2, dim=-1).indices  # [T, k]
    weights = CheckpointWeights(SafetensorsIndex(str(tmp_path)), ModelSpec.from_pretrained(tmp_path))
    look = GateLookahead.from_weights(weights)
    _, pred, _ = look.route(1, captured["resid"])
    assert [set(r) for r in pred.tolist()] == [set(r) for r in truth.tolist()]
    # through the combined predictor, one token at a time, budget k: every expert predicted
    predictor = ExpertPredictor.from_weights(weights)
    l0 = out.router_logits[0].topk(2, dim=-1).indices
    for t in range(ids.shape[1]):
        hot = predictor.predict_next(0, captured["resid"][t:t + 1], l0[t:t + 1], budget=2)
        assert set(hot) == set(truth[t].tolist())
        predictor.observe(0, l0[t:t + 1])
        predictor.observe(1, truth[t:t + 1])
        predictor.reset_sequence()
    assert predictor.hit_rate(1, "lookahead") == 1.0 and predictor.source(1) == "lookahead"
    assert predictor.hit_rate(1) == 1.0


def _spec(num_layers=3, num_experts=4, hidden=8, top_k=1) -> ModelSpec:
    return ModelSpec.from_config({
        "model_type": "mixtral", "vocab_size": 16, "hidden_size": hidden, "intermediate_size": 8,
        "num_hidden_layers": num_layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_local_experts": num_experts, "num_experts_per_tok": top_k, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6})


def _gates(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: {"post_attn_norm": torch.ones(spec.hidden_size),
                "router": torch.randn(spec.num_experts, spec.hidden_size, generator=g)} for m in spec.moe_layers}


def test_combined_uses_the_better_source_per_layer():
    """Layer 1's routing is what its router says about layer 0's residual (lookahead right, the table cannot
    know); layer 2's routing is a fixed function of layer 1's experts (table right, lookahead guessing)."""
    spec = _spec()
    look = GateLookahead(spec, _gates(spec))
    predictor = ExpertPredictor(spec, CorrelationPrefetcher(3, 4), look)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = torch.from_numpy(rng.standard_normal((1, spec.hidden_size))).float()
        l0 = torch.tensor([[int(rng.integers(4))]])
        l1 = look.route(1, x)[1]  # layer 1 follows its router on this residual
        l2 = (l1 + 1) % 4  # layer 2 follows layer 1's choice
        predictor.predict_next(-1, None, None, budget=1)
        predictor.observe(0, l0)
        predictor.predict_next(0, x, l0, budget=1)
        predictor.observe(1, l1)
        predictor.predict_next(1, x, l1, budget=1)
        predictor.observe(2, l2)
        predictor.reset_sequence()
    assert predictor.source(1) == "lookahead" and predictor.source(2) == "table"
    assert predictor.hit_rate(1, "lookahead") == 1.0 and predictor.hit_rate(1, "table") < 0.6
    assert predictor.hit_rate(2, "table") > 0.9 and predictor.hit_rate(2, "lookahead") < 0.6
    # the chosen predictions track the better source of each layer (within the few before it was measured)
    for layer in (1, 2):
        best = max(predictor.hit_rate(layer, "table"), predictor.hit_rate(layer, "lookahead"))
        assert predictor.hit_rate(layer) >= best - 0.05
    summary = predictor.summary()
    assert summary[2]["source"] == "table" and summary[1]["lookahead"]["predictions"] == 200


def test_group_prediction_ranks_by_tokens_then_respects_budget_and_exclude():
    spec = _spec(top_k=2)
    look = GateLookahead(spec, _gates(spec, seed=3))
    x = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = look.route(1, x)[1]
    counts = torch.bincount(ids.reshape(-1), minlength=4)
    ranking = look.predict(1, x, 4)
    assert sorted(ranking) == [0, 1, 2, 3]
    assert [int(counts[e]) for e in ranking] == sorted(counts.tolist(), reverse=True)
    predictor = ExpertPredictor(spec, None, look)
    top = ranking[0]
    hot = predictor.predict_next(0, x, None, budget=2, exclude=[top])
    assert hot == [e for e in ranking if e != top][:2]
    predictor.observe(1, ids)
    used = set(ids.reshape(-1).tolist()) - {top}
    assert predictor.counts[1]["chosen"].used == len(used)  # excluded (resident) experts are not misses
    assert predictor.predict_next(2, x, None, budget=2) == []  # no MoE layer after the last


def test_bad_inputs_are_named():
    spec = _spec()
    look = GateLookahead(spec, _gates(spec))
    with pytest.raises(ValueError, match=r"hidden_states must be \[T, 8\]"):
        look.route(1, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="missing layers"):
        GateLookahead(spec, {0: _gates(spec)[0]})
    with pytest.raises(ValueError, match="table is 2 layers x 4 experts"):
        ExpertPredictor(spec, CorrelationPrefetcher(2, 4), look)
    with pytest.raises(ValueError, match="out of range"):
        ExpertPredictor(spec, None, look).predict_next(5, None, None, 1)
    with pytest.raises(ValueError, match="needs a correlation table, a gate lookahead"):
        ExpertPredictor(spec)
