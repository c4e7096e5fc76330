"""Batch-aware expert selection (klotski.model.expert_selection): its rules on random and tied router logits,
for softmax, grouped softmax and DeepSeek-V3 sigmoid routers, against a per-token reference in plain Python."""
import math

import pytest
import torch

from klotski.model.expert_selection import ExpertSelection, router_weights, select_experts
from klotski.model.router import group_mask, select
from tests.model.test_router import CASES, E, spec_for


def logits_for(T, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many equal logits within and across tokens
        return torch.randint(0, 3, (T, E), generator=g).float()
    return torch.randn(T, E, generator=g) * 2.0


def bias_for(spec, seed=7):
    return torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.1 if spec.router_bias else None


def allowed_experts(spec, logits_row, bias):
    """The experts the router may choose for one token (its kept groups), and its ranking score per expert."""
    x = [float(v) for v in logits_row]
    if spec.router_scoring == "softmax":
        m = max(x)
        z = sum(math.exp(v - m) for v in x)
        score = [math.exp(v - m) / z for v in x]
        rank = x
    else:
        score = [1 / (1 + math.exp(-v)) for v in x]
        rank = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(score)]
    grouped = spec.n_group > 1 and spec.topk_method != "greedy"
    if not grouped:
        return set(range(E)), rank
    # the router's own group choice (torch.topk over group scores: its tie order is the router's behaviour)
    base = torch.tensor([score if spec.router_scoring == "softmax" else rank], dtype=torch.float32)
    keep = group_mask(base, spec.n_group, spec.topk_group, "max" if spec.router_scoring == "softmax" else "top2")
    return set(keep[0].nonzero().flatten().tolist()), rank


def reference(spec, logits, ids, sel, free=None, bias=None):
    """Per-token Python reference of the selection rules -> list of new id sets (None: row unchanged)."""
    T, k = ids.shape
    conf = [[float(v) if spec.router_scoring == "softmax" else -math.log1p(math.exp(-float(v))) for v in row]
            for row in logits]
    rows = [ids[t].tolist() for t in range(T)]
    ranks = [allowed_experts(spec, logits[t], bias) for t in range(T)]
    top1 = [max(r, key=lambda e: (ranks[t][1][e], -r.index(e))) for t, r in enumerate(rows)]
    score = [0.0] * E
    for t, r in enumerate(rows):
        for e in r:
            if e == top1[t]:
                score[e] += 1.0
            else:
                gap = min(0.0, conf[t][e] - conf[t][top1[t]])
                b = min(math.floor(-gap / sel.bin_width), sel.num_bins - 1)
                score[e] += math.exp(-(b + 0.5) * sel.bin_width)
    used = sorted({e for r in rows for e in r})
    droppable = [e for e in used if e not in set(top1) and not (free is not None and sel.offload_aware and free[e])]
    n_drop = min(math.floor(sel.aggressiveness * len(droppable) + 0.5), len(used) - k)
    dropped = set(sorted(droppable, key=lambda e: (score[e], -e))[: max(n_drop, 0)])
    active = [e for e in used if e not in dropped]
    out = []
    for t, r in enumerate(rows):
        kept = [e for e in r if e not in dropped]
        if len(kept) == k:
            out.append(None)
            continue
        allowed, rank = ranks[t]
        cand = sorted((e for e in active if e not in kept and e in allowed), key=lambda e: (-rank[e], e))
        need = k - len(kept)
        out.append(set(kept) | set(cand[:need]) if len(cand) >= need else None)
    return out, dropped


def expected_weights(spec, logits_row, new_ids):
    x = logits_row.double()
    if spec.router_scoring == "softmax":
        w = torch.softmax(x, -1)[new_ids]
        if spec.norm_topk_prob and spec.topk_method == "greedy":
            w = w / w.sum()
    else:
        w = torch.sigmoid(x)[new_ids]
        if spec.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
    return (w * spec.routed_scaling_factor).float()


def check_rules(spec, logits, sel, free=None, T=None):
    bias = bias_for(spec)
    w, ids = select(spec, logits, bias)
    out = select_experts(spec, logits, w, ids, sel, free=free, bias=bias)
    again = select_experts(spec, logits, w, ids, sel, free=free, bias=bias)
    assert torch.equal(out.topk_ids, again.topk_ids) and torch.equal(out.topk_weights, again.topk_weights)
    assert out.topk_ids.dtype == ids.dtype and out.topk_weights.dtype == torch.float32
    assert out.topk_ids.shape == ids.shape
    ref, dropped = reference(spec, logits, ids, sel, free, bias)
    before = set(ids.flatten().tolist())
    after = set(out.topk_ids.flatten().tolist())
    assert after <= before  # never grows
    assert out.distinct_before == len(before) and out.distinct_after == len(after)
    moved = 0
    for t in range(ids.shape[0]):
        new = out.topk_ids[t].tolist()
        assert len(set(new)) == spec.top_k  # exactly k distinct
        assert new[0] == int(ids[t, 0])  # top-1 kept, still first
        if ref[t] is None:
            assert new == ids[t].tolist() and torch.equal(out.topk_weights[t], w[t])  # untouched, bit for bit
        else:
            assert set(new) == ref[t]
            allowed, _ = allowed_experts(spec, logits[t], bias)
            assert set(new) <= allowed
            torch.testing.assert_close(out.topk_weights[t], expected_weights(spec, logits[t], out.topk_ids[t]),
                                       rtol=1e-5, atol=1e-6)
            moved += len(set(ids[t].tolist()) - set(new))
    assert out.remapped == moved
    if free is not None and sel.offload_aware:
        assert not any(bool(free[e]) for e in dropped)
        assert {e for e in before if free[e]} <= after  # a free expert keeps its assignments
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("a", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_rules_on_random_logits(name, a, ties):
    spec = CASES[name]
    for seed in range(3):
        check_rules(spec, logits_for(8, seed, ties), ExpertSelection("lynx", a))


def test_selection_reduces_distinct_experts():
    spec = spec_for(top_k=4)
    out = check_rules(spec, logits_for(8, 1), ExpertSelection("lynx", 1.0))
    assert out.distinct_after < out.distinct_before and out.remapped > 0
    less = check_rules(spec, logits_for(8, 1), ExpertSelection("lynx", 0.3))
    assert out.distinct_after <= less.distinct_after <= less.distinct_before


@pytest.mark.parametrize("value", [None, "off", "lynx:0", "lynx-offload:0.0"])
def test_off_returns_router_output_unchanged(value):
    spec = CASES["softmax_greedy_renorm"]
    logits = logits_for(16, 3)
    w, ids = select(spec, logits)
    out = select_experts(spec, logits, w, ids, ExpertSelection.parse(value))
    assert out.topk_ids is ids and out.topk_weights is w and out.remapped == 0


def test_top_k_one_and_single_token_are_unchanged():
    spec = spec_for(top_k=1)
    logits = logits_for(16, 4)
    w, ids = select(spec, logits)
    out = select_experts(spec, logits, w, ids, ExpertSelection("lynx", 1.0))
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, w) and out.remapped == 0
    for name, spec in CASES.items():
        one = logits_for(1, 5)
        bias = bias_for(spec)
        w, ids = select(spec, one, bias)
        out = select_experts(spec, one, w, ids, ExpertSelection("lynx", 1.0), bias=bias)
        assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, w), name


@pytest.mark.parametrize("name", ["softmax_greedy", "v3_flat_no_norm", "v3_grouped"])
def test_offload_aware_never_drops_free_experts(name):
    spec = CASES[name]
    g = torch.Generator().manual_seed(11)
    for seed in range(4):
        free = torch.rand(E, generator=g) < 0.4
        check_rules(spec, logits_for(8, seed), ExpertSelection("lynx-offload", 1.0), free=free)
    all_free = torch.ones(E, dtype=torch.bool)
    logits = logits_for(8, 0)
    bias = bias_for(spec)
    w, ids = select(spec, logits, bias)
    out = select_experts(spec, logits, w, ids, ExpertSelection("lynx-offload", 1.0), free=all_free, bias=bias)
    assert out.topk_ids is ids  # everything resident: nothing to save, nothing changed


def test_offload_aware_spends_drops_on_costly_experts():
    spec = spec_for(top_k=4)
    logits = logits_for(8, 2)
    w, ids = select(spec, logits)
    free = torch.zeros(E, dtype=torch.bool)
    free[:E // 2] = True
    plain = select_experts(spec, logits, w, ids, ExpertSelection("lynx", 0.5), free=free)
    aware = select_experts(spec, logits, w, ids, ExpertSelection("lynx-offload", 0.5), free=free)
    costly = lambda ids_: len({e for e in ids_.flatten().tolist() if not free[e]})  # noqa: E731
    assert costly(aware.topk_ids) <= costly(plain.topk_ids)


def test_router_weights_reproduce_the_router_on_its_own_ids():
    for name, spec in CASES.items():
        logits = logits_for(32, 9)
        bias = bias_for(spec)
        w, ids = select(spec, logits, bias)
        torch.testing.assert_close(router_weights(spec, logits, ids), w, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("bad", ["lynx", "lynx:", "lynx:1.5", "lynx:-0.1", "lynx:nan", "foo:0.5", "on", 0.5,
                                 "lynx:x"])
def test_bad_values_are_refused_clearly(bad):
    with pytest.raises(ValueError, match="expert_selection"):
        ExpertSelection.parse(bad)


def test_parse_round_trips():
    for text in ("off", "lynx:0.5", "lynx-offload:0.25", "lynx:1"):
        assert str(ExpertSelection.parse(text)) == ("lynx:1" if text == "lynx:1" else text)
    assert ExpertSelection.parse(" LYNX:0.5 ") == ExpertSelection("lynx", 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_selection_matches_cpu(name):
    spec = CASES[name]
    logits = logits_for(16, 21)
    bias = bias_for(spec)
    sel = ExpertSelection("lynx-offload", 0.7)
    free = torch.arange(E) % 3 == 0
    w, ids = select(spec, logits, bias)
    cpu = select_experts(spec, logits, w, ids, sel, free=free, bias=bias)
    dev = torch.device("cuda")
    wd, idsd = select(spec, logits.to(dev), bias.to(dev) if bias is not None else None)
    gpu = select_experts(spec, logits.to(dev), wd, idsd, sel, free=free.to(dev),
                         bias=bias.to(dev) if bias is not None else None)
    assert gpu.topk_ids.device.type == "cuda" and torch.equal(gpu.topk_ids.cpu(), cpu.topk_ids)
    torch.testing.assert_close(gpu.topk_weights.cpu(), cpu.topk_weights, rtol=1e-5, atol=1e-6)
