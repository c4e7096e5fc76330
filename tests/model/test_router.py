"""Routers against an independent per-token reference and against transformers' router modules."""
import dataclasses

import pytest
import torch

from klotski.model import ModelSpec
from klotski.model.router import route, select

E, H, T = 16, 32, 64


def spec_for(scoring="softmax", method="greedy", top_k=4, n_group=1, topk_group=1, norm=False, scale=1.0, bias=False,
             model_type="deepseek_v2"):
    return ModelSpec(
        model_type=model_type, vocab_size=8, hidden_size=H, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
        intermediate_size=0, moe_intermediate_size=8, num_experts=E, top_k=top_k, layer_kinds=("moe",),
        norm_topk_prob=norm, router_scoring=scoring, routed_scaling_factor=scale, topk_method=method,
        n_group=n_group, topk_group=topk_group, router_bias=bias,
    )


CASES = {
    "softmax_greedy": spec_for(),
    "softmax_greedy_renorm": spec_for(norm=True, model_type="mixtral"),
    "v2_greedy_scaled": spec_for(scale=16.0),
    "v2_grouped": spec_for(method="group_limited_greedy", n_group=4, topk_group=2, scale=1.5),
    "v3_grouped": spec_for("sigmoid", "noaux_tc", top_k=6, n_group=4, topk_group=2, norm=True, scale=2.5, bias=True,
                           model_type="deepseek_v3"),
    "v3_flat_no_norm": spec_for("sigmoid", "noaux_tc", top_k=3, norm=False, scale=1.0, bias=True,
                                model_type="deepseek_v3"),
    "v3_no_bias": spec_for("sigmoid", "noaux_tc", top_k=4, n_group=8, topk_group=3, norm=True),
}


def reference(spec: ModelSpec, logits: torch.Tensor, bias: torch.Tensor | None):
    """One token at a time, straight from the DeepSeek papers' description (no shared code with the router)."""
    ids_out, w_out = [], []
    per = spec.num_experts // spec.n_group
    for row in logits.double():
        if spec.router_scoring == "softmax":
            scores = row.exp() / row.exp().sum()
            choice = scores.clone()
        else:
            scores = 1 / (1 + (-row).exp())
            choice = scores + (bias.double() if bias is not None else 0)
        allowed = list(range(spec.num_experts))
        if spec.topk_method != "greedy" and spec.n_group > 1:
            def group_score(g):
                vals = sorted((float(choice[e]) for e in range(g * per, (g + 1) * per)), reverse=True)
                return vals[0] if spec.router_scoring == "softmax" else vals[0] + vals[1]
            groups = sorted(range(spec.n_group), key=group_score, reverse=True)[: spec.topk_group]
            allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: float(choice[e]), reverse=True)[: spec.top_k]
        weights = [float(scores[e]) for e in chosen]
        if spec.norm_topk_prob:
            total = sum(weights)
            weights = [x / total for x in weights]
        ids_out.append(chosen)
        w_out.append([x * spec.routed_scaling_factor for x in weights])
    return torch.tensor(w_out), torch.tensor(ids_out)


def by_id(weights, ids):
    """Sort each row's (id, weight) pairs by id so orderings from different top-k calls compare."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def inputs(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = {"router": torch.randn(E, H, generator=g) / H**0.5 * 4}
    if spec.router_bias:
        w["router_bias"] = 0.3 * torch.randn(E, generator=g)
    return h, w


@pytest.mark.parametrize("name", CASES)
def test_router_matches_per_token_reference(name):
    spec = CASES[name]
    h, w = inputs(spec)
    weights, ids = route(spec, w, h)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (T, spec.top_k)
    ref_w, ref_ids = reference(spec, h.double() @ w["router"].double().T, w.get("router_bias"))
    weights, ids = by_id(weights, ids)
    ref_w, ref_ids = by_id(ref_w, ref_ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w.float(), rtol=1e-5, atol=1e-6)


def test_grouped_routing_and_bias_change_choices():
    """The cases above would be vacuous if groups and bias never mattered on these inputs."""
    v3 = CASES["v3_grouped"]
    h, w = inputs(v3)
    _, ids = by_id(*route(v3, w, h))
    _, flat = by_id(*route(dataclasses.replace(v3, n_group=1, topk_group=1), w, h))
    _, unbiased = by_id(*route(v3, {"router": w["router"], "router_bias": torch.zeros(E)}, h))
    assert (ids != flat).any(dim=1).sum() > T // 8
    assert (ids != unbiased).any(dim=1).sum() > T // 8
    v2 = CASES["v2_grouped"]
    _, g_ids = by_id(*route(v2, w, h))
    _, greedy = by_id(*route(dataclasses.replace(v2, topk_method="greedy"), w, h))
    assert (g_ids != greedy).any(dim=1).sum() > T // 8


def hf_router(spec: ModelSpec, w):
    import transformers as tf
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    common = dict(hidden_size=H, num_attention_heads=1, num_key_value_heads=1, n_routed_experts=E,
                  num_experts_per_tok=spec.top_k, n_group=spec.n_group, topk_group=spec.topk_group,
                  routed_scaling_factor=spec.routed_scaling_factor, norm_topk_prob=spec.norm_topk_prob)
    if spec.router_scoring == "softmax":
        router = DeepseekV2TopkRouter(tf.DeepseekV2Config(**common, topk_method=spec.topk_method))
    else:
        router = DeepseekV3TopkRouter(tf.DeepseekV3Config(**common))
        router.e_score_correction_bias.copy_(w.get("router_bias", torch.zeros(E)))
    with torch.no_grad():
        router.weight.copy_(w["router"])
    return router


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("v2", "v3"))])
def test_router_matches_transformers(name):
    spec = CASES[name]
    h, w = inputs(spec, seed=1)
    with torch.no_grad():
        _, hf_w, hf_ids = hf_router(spec, w)(h)
    weights, ids = by_id(*route(spec, w, h))
    hf_w, hf_ids = by_id(hf_w, hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_non_finite_logit_rows_give_valid_ids_and_finite_weights(name):
    spec = CASES[name]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, E, generator=g) * 4
    logits[0] = float("nan")
    logits[1] = float("inf")
    logits[2] = float("-inf")
    logits[3, ::3] = float("nan")
    logits[4, 5] = float("inf")
    logits[5, :7] = float("-inf")
    bias = 0.3 * torch.randn(E, generator=g) if spec.router_bias else None
    weights, ids = select(spec, logits, bias)
    assert torch.isfinite(weights).all()
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row.tolist())) == spec.top_k for row in ids)  # k distinct experts per token
    if spec.router_scoring == "softmax" and spec.n_group == 1:
        assert 5 in ids[4].tolist()  # a +inf logit is that token's strongest expert
        assert not set(ids[3].tolist()) & set(range(0, E, 3))  # NaN experts rank last
    # finite rows route exactly as they would alone
    w_alone, ids_alone = select(spec, logits[6:], bias)
    assert torch.equal(ids[6:], ids_alone) and torch.equal(weights[6:], w_alone)


def test_bf16_activations_route_in_fp32_for_deepseek():
    spec = CASES["v3_grouped"]
    h, w = inputs(spec)
    hb = h.bfloat16()
    weights, ids = route(spec, {k: v.bfloat16() if k == "router" else v for k, v in w.items()}, hb)
    ref_w, ref_ids = route(spec, {**w, "router": w["router"].bfloat16().float()}, hb.float())
    assert weights.dtype == torch.float32 and torch.equal(ids, ref_ids) and torch.equal(weights, ref_w)
