"""int4 fused_moe (Triton, under the CPU interpreter, and the torch path) against the dense torch reference over
the dequantized weights.

w13 (K = H = 96) uses groups of 32 (3 groups per row), w2 (K = I = 200) groups of 8 (25 groups): odd group
counts, different group sizes per matrix, H and I not multiples of any block size. Symmetric and asymmetric
weights and fp16 / fp32 scales rotate across the cases.
"""
import itertools

import pytest
import torch

from klotski.quant import Int4Weight, quantize_int4
from klotski.triton_kernels import fused_moe, fused_moe_torch, invoke_fused_moe
from moe_testing import make_problem, rel_error

pytestmark = pytest.mark.usefixtures("triton_interpret", "poisoned_allocations")

HIDDEN, INTER = 96, 200
G13, G2 = 32, 8
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(m, e, k) for m, e, k in itertools.product((1, 7, 33, 130), (4, 8, 60), (1, 2, 6))
          if k <= e and (m, e) not in ((130, 60), (1, 4))]
SLOT_KINDS = ("identity", "permuted", "missing")


def quantized(problem, symmetric=False, scale_dtype=torch.float32):
    """(int4 w13, int4 w2, dequantized fp32 w13, w2) of a problem's weights."""
    q13 = quantize_int4(problem.w13.float(), G13, symmetric=symmetric, scale_dtype=scale_dtype)
    q2 = quantize_int4(problem.w2.float(), G2, symmetric=symmetric, scale_dtype=scale_dtype)
    return q13, q2, q13.dequantize(), q2.dequantize()


def reference(problem, d13, d2, activation="silu", out=None, expert_slots="same"):
    slots = problem.expert_slots if expert_slots == "same" else expert_slots
    ref_out = None if out is None else out.float().clone()
    return fused_moe_torch(problem.hidden_states.float(), d13, d2, problem.topk_weights.float(), problem.topk_ids,
                           slots, out=ref_out, activation=activation)


@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[f"M{m}-E{e}-k{k}" for m, e, k in SHAPES])
def test_int4_fused_moe_matches_dequantized_reference(case):
    num_tokens, num_experts, top_k = SHAPES[case]
    dtype = (torch.float32, torch.float16)[case % 2]
    slots = SLOT_KINDS[case % 3]
    activation = ("silu", "gelu")[(case // 2) % 2]
    symmetric = (case // 3) % 2 == 1
    problem = make_problem(num_tokens, num_experts, top_k, HIDDEN, INTER, dtype, slots, seed=case)
    q13, q2, d13, d2 = quantized(problem, symmetric, (torch.float32, torch.float16)[(case // 4) % 2])
    tri_out = fused_moe(problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids,
                        problem.expert_slots, activation=activation)
    ref_out = reference(problem, d13, d2, activation)
    assert tri_out.dtype == dtype and tri_out.shape == (num_tokens, HIDDEN)
    err = rel_error(tri_out, ref_out)
    assert err <= TOLERANCE[dtype], f"{dtype} {slots} {activation} sym={symmetric}: rel. error {err:.2e}"


def test_torch_path_equals_dense_torch_over_dequantized_weights():
    """fp32: the int4 torch path computes exactly the dense reference's products."""
    problem = make_problem(33, 8, 2, HIDDEN, INTER, torch.float32, "missing", seed=3)
    for symmetric in (False, True):
        q13, q2, d13, d2 = quantized(problem, symmetric)
        got = fused_moe_torch(problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids,
                              problem.expert_slots)
        assert torch.equal(got, reference(problem, d13, d2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_partial_then_rest_accumulates(dtype):
    problem = make_problem(33, 8, 2, HIDDEN, INTER, dtype, slots="permuted", seed=11, unused_experts=0)
    q13, q2, d13, d2 = quantized(problem, scale_dtype=torch.float16)
    all_slots = problem.expert_slots
    cold = torch.tensor([1, 4, 6])
    hot_slots, cold_slots = all_slots.clone(), torch.full_like(all_slots, -1)
    hot_slots[cold] = -1
    cold_slots[cold] = all_slots[cold]
    start = torch.randn(33, HIDDEN).to(dtype)
    out = start.clone()
    args = (problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids)
    assert fused_moe(*args, hot_slots, out=out) is out
    fused_moe(*args, cold_slots, out=out)
    assert rel_error(out, reference(problem, d13, d2, out=start)) <= TOLERANCE[dtype]
    none = torch.full_like(all_slots, -1)
    assert torch.equal(fused_moe(*args, none, out=start.clone()), start)


def test_int4_bfloat16_upcast_and_block_configs():
    problem = make_problem(40, 8, 2, HIDDEN, INTER, torch.bfloat16, slots="missing", seed=6)
    q13, q2, d13, d2 = quantized(problem, scale_dtype=torch.bfloat16)
    args = (problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids, problem.expert_slots)
    assert rel_error(fused_moe(*args), reference(problem, d13, d2)) <= TOLERANCE[torch.bfloat16]
    p32 = make_problem(40, 8, 2, HIDDEN, INTER, torch.float32, slots="missing", seed=7)
    q13, q2, d13, d2 = quantized(p32, symmetric=True)
    args = (p32.hidden_states, q13, q2, p32.topk_weights, p32.topk_ids, p32.expert_slots)
    for cfg in (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1),  # BK < G
                dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)):  # BK spans groups
        assert rel_error(invoke_fused_moe(*args, config=cfg), reference(p32, d13, d2)) <= 1e-5


def test_int4_token_chunks_equal_one_pass():
    problem = make_problem(33, 8, 2, HIDDEN, INTER, torch.float32, slots="missing", seed=5)
    q13, q2, _, _ = quantized(problem)
    args = (problem.hidden_states, q13, q2, problem.topk_weights, problem.topk_ids, problem.expert_slots)
    assert rel_error(fused_moe(*args, chunk_tokens=8), fused_moe(*args)) <= 1e-6


def test_int4_bad_inputs_are_named():
    problem = make_problem(7, 4, 2, HIDDEN, INTER, seed=8)
    q13, q2, d13, d2 = quantized(problem)
    base = (problem.hidden_states,)
    with pytest.raises(ValueError, match="both be int4"):
        fused_moe(*base, q13, d2, problem.topk_weights, problem.topk_ids)
    with pytest.raises(ValueError, match=r"w2 must have shape \[S=4, H=96, I=200\]"):
        fused_moe(*base, q13, q2[:3], problem.topk_weights, problem.topk_ids)
    strided = Int4Weight(q13.qweight.transpose(1, 2).contiguous().transpose(1, 2), q13.scales, q13.zeros, G13)
    with pytest.raises(ValueError, match="w13.qweight must have unit stride"):
        fused_moe(*base, strided, q2, problem.topk_weights, problem.topk_ids)
    with pytest.raises(ValueError, match="expert_slots must lie in"):
        fused_moe(*base, q13, q2, problem.topk_weights, problem.topk_ids, torch.tensor([0, 1, 2, 9], dtype=torch.int32))
