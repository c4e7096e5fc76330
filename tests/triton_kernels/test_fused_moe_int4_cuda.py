"""The int4 (w4a16) kernels compiled for a CUDA GPU (skipped without one): bf16 activations against the fp32
dense reference over the dequantized weights, the two-call accumulation, and a model-sized shape."""
import itertools

import pytest
import torch

from klotski.quant import quantize_int4
from klotski.triton_kernels import fused_moe, fused_moe_torch
from moe_testing import make_problem, rel_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("compiled_kernels", "poisoned_allocations"),
]

HIDDEN, INTER = 96, 200
SHAPES = [(m, e, k) for m, e, k in itertools.product((1, 7, 33, 130), (4, 8, 60), (1, 2, 6)) if k <= e]


@pytest.fixture
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def quantized(problem, symmetric, group13=32, group2=8):
    q13 = quantize_int4(problem.w13.float(), group13, symmetric, scale_dtype=problem.hidden_states.dtype)
    q2 = quantize_int4(problem.w2.float(), group2, symmetric, scale_dtype=problem.hidden_states.dtype)
    return q13, q2


def reference(problem, q13, q2, out=None):
    return fused_moe_torch(problem.hidden_states.float(), q13.dequantize(), q2.dequantize(),
                           problem.topk_weights.float(), problem.topk_ids, problem.expert_slots,
                           out=None if out is None else out.float().clone())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[f"M{m}-E{e}-k{k}" for m, e, k in SHAPES])
def test_int4_bf16_matches_fp32_reference(case, symmetric):
    problem = make_problem(*SHAPES[case], HIDDEN, INTER, torch.bfloat16, ("identity", "permuted", "missing")[case % 3],
                           seed=case, device="cuda")
    q13, q2 = quantized(problem, symmetric)
    out = fused_moe(problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids, problem.expert_slots)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    assert rel_error(out, reference(problem, q13, q2)) <= 1e-2


def test_int4_hot_then_cold_accumulates():
    problem = make_problem(33, 8, 2, HIDDEN, INTER, torch.bfloat16, "permuted", seed=3, device="cuda",
                           unused_experts=0)
    q13, q2 = quantized(problem, False)
    hot, cold = problem.expert_slots.clone(), torch.full_like(problem.expert_slots, -1)
    cold_ids = torch.tensor([1, 4, 6], device="cuda")
    hot[cold_ids] = -1
    cold[cold_ids] = problem.expert_slots[cold_ids]
    out = torch.zeros(33, HIDDEN, device="cuda")
    args = (problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids)
    fused_moe(*args, hot, out=out)
    fused_moe(*args, cold, out=out)
    assert rel_error(out, reference(problem, q13, q2)) <= 1e-2


def test_int4_model_sized_shape():
    """Qwen3-30B-A3B's expert shape (H 2048, I 768, 128 experts, top-8), group 128."""
    problem = make_problem(64, 128, 8, 2048, 768, torch.bfloat16, "missing", seed=5, device="cuda")
    q13, q2 = quantized(problem, False, 128, 128)
    out = fused_moe(problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids, problem.expert_slots)
    assert rel_error(out, reference(problem, q13, q2)) <= 1e-2
