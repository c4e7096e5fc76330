"""Triton fused_moe (``tri_``) against the torch reference (``ref_``) under the CPU interpreter.

Every shape of the grid M x E x top_k runs once; dtype, slot table and activation rotate across the grid so
each combination of neighbours is covered without the full product (the interpreter is slow). H and I are not
multiples of any block size used. fp16 is compared with the reference evaluated in fp32 on the same values.
"""
import importlib
import itertools

import pytest
import torch

from klotski.triton_kernels import fused_moe, fused_moe_torch, invoke_fused_moe
from moe_testing import make_problem, rel_error

pytestmark = pytest.mark.usefixtures("triton_interpret", "poisoned_allocations")

HIDDEN, INTER = 96, 200
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(m, e, k) for m, e, k in itertools.product((1, 7, 33, 130), (4, 8, 60), (1, 2, 6)) if k <= e]
SLOT_KINDS = ("identity", "permuted", "missing")


def reference(problem, activation="silu", out=None):
    """fused_moe_torch on the fp32 upcast of the problem (exact for fp32 inputs)."""
    ref_out = None if out is None else out.float().clone()
    return fused_moe_torch(*problem.upcast().args(), out=ref_out, activation=activation)


@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[f"M{m}-E{e}-k{k}" for m, e, k in SHAPES])
def test_fused_moe_matches_reference(case):
    num_tokens, num_experts, top_k = SHAPES[case]
    dtype = (torch.float32, torch.float16)[case % 2]
    slots = SLOT_KINDS[case % 3]
    activation = ("silu", "gelu")[(case // 2) % 2]
    problem = make_problem(num_tokens, num_experts, top_k, HIDDEN, INTER, dtype, slots, seed=case)
    tri_out = fused_moe(*problem.args(), activation=activation)
    ref_out = reference(problem, activation)
    assert tri_out.dtype == dtype and tri_out.shape == (num_tokens, HIDDEN)
    err = rel_error(tri_out, ref_out)
    assert err <= TOLERANCE[dtype], f"{dtype} {slots} {activation}: rel. error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_calls_equal_one_call_with_all_resident(dtype):
    """Hot experts first, then the cold ones as they land: the sum over both calls is the full MoE."""
    problem = make_problem(33, 8, 2, HIDDEN, INTER, dtype, slots="permuted", seed=11, unused_experts=0)
    all_slots = problem.expert_slots
    cold = torch.tensor([1, 4, 6])
    hot_slots, cold_slots = all_slots.clone(), torch.full_like(all_slots, -1)
    hot_slots[cold] = -1
    cold_slots[cold] = all_slots[cold]
    start = torch.randn(33, HIDDEN).to(dtype)
    out = start.clone()
    returned = fused_moe(*problem.args(expert_slots=hot_slots), out=out)
    assert returned is out
    fused_moe(*problem.args(expert_slots=cold_slots), out=out)
    ref_out = reference(problem, out=start)
    assert rel_error(out, ref_out) <= TOLERANCE[dtype]
    one_call = fused_moe(*problem.args(), out=start.clone())
    assert rel_error(out, one_call) <= TOLERANCE[dtype]


def test_fp32_out_accumulates_half_precision_inputs():
    problem = make_problem(7, 8, 2, HIDDEN, INTER, torch.float16, slots="missing", seed=5)
    start = torch.randn(7, HIDDEN)
    out = fused_moe(*problem.args(), out=start.clone())
    assert out.dtype == torch.float32
    assert rel_error(out, reference(problem, out=start)) <= 1e-3


def test_no_resident_expert_leaves_out_unchanged():
    problem = make_problem(7, 4, 2, HIDDEN, INTER, torch.float32, slots="permuted", seed=3)
    none_resident = torch.full_like(problem.expert_slots, -1)
    start = torch.randn(7, HIDDEN)
    out = fused_moe(*problem.args(expert_slots=none_resident), out=start.clone())
    assert torch.equal(out, start)
    fresh = fused_moe(*problem.args(expert_slots=none_resident))
    assert torch.equal(fresh, torch.zeros(7, HIDDEN))


def test_no_tokens():
    problem = make_problem(0, 4, 2, HIDDEN, INTER, torch.float32, seed=4)
    assert fused_moe(*problem.args()).shape == (0, HIDDEN)


def test_bfloat16_upcast_under_interpreter():
    problem = make_problem(33, 8, 2, HIDDEN, INTER, torch.bfloat16, slots="missing", seed=6)
    tri_out = fused_moe(*problem.args())
    assert tri_out.dtype == torch.bfloat16
    assert rel_error(tri_out, reference(problem)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1),  # several K steps
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1),  # swizzled, tall
        dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
    ],
    ids=["bm16-bn32-bk32", "bm64-g4", "bm32-bn128-bk16"],
)
def test_block_configs(config):
    problem = make_problem(40, 8, 2, HIDDEN, INTER, torch.float32, slots="missing", seed=7)
    tri_out = invoke_fused_moe(*problem.args(), config=config)
    assert rel_error(tri_out, reference(problem)) <= TOLERANCE[torch.float32]


def test_bad_config_is_rejected():
    problem = make_problem(7, 4, 2, HIDDEN, INTER, seed=8)
    with pytest.raises(ValueError, match="BLOCK_N"):
        invoke_fused_moe(*problem.args(), config=dict(BLOCK_M=16, BLOCK_N=48, BLOCK_K=32, GROUP_M=1,
                                                      num_warps=4, num_stages=1))


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path must not run on plain CPU")

    fused_moe_module = importlib.import_module("klotski.triton_kernels.fused_moe")

    monkeypatch.setattr(fused_moe_module, "invoke_fused_moe", no_triton)
    problem = make_problem(7, 8, 2, HIDDEN, INTER, torch.float32, slots="missing", seed=9)
    assert torch.equal(fused_moe(*problem.args()), fused_moe_torch(*problem.args()))


def test_triton_path_on_plain_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    problem = make_problem(7, 8, 2, HIDDEN, INTER, torch.float32, seed=10)
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        invoke_fused_moe(*problem.args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_chunks_equal_one_pass(dtype):
    """A call over more tokens than ``chunk_tokens`` runs chunk by chunk (bounded workspace) and gives the
    one-pass result, with and without accumulation into ``out``; so does the torch reference."""
    problem = make_problem(33, 8, 2, HIDDEN, INTER, dtype, slots="missing", seed=5)
    whole = fused_moe(*problem.args())
    chunked = fused_moe(*problem.args(), chunk_tokens=8)  # 5 chunks, the last of 1 token
    assert rel_error(chunked, whole) <= TOLERANCE[dtype]
    start = torch.randn(33, HIDDEN).to(dtype)
    acc = fused_moe(*problem.args(), out=start.clone(), chunk_tokens=10)
    assert rel_error(acc, fused_moe(*problem.args(), out=start.clone())) <= TOLERANCE[dtype]
    ref = problem.upcast().args()
    assert torch.equal(fused_moe_torch(*ref, chunk_tokens=7), fused_moe_torch(*ref, chunk_tokens=7))
    assert rel_error(fused_moe_torch(*ref, chunk_tokens=7), fused_moe_torch(*ref)) <= 1e-6


def test_workspace_is_bounded_by_one_chunk():
    from klotski.triton_kernels import CHUNK_TOKENS, workspace_bytes

    small = workspace_bytes(100, 2, HIDDEN, INTER, 2)
    assert small == 100 * 2 * (INTER * 2 + HIDDEN * 4)
    assert workspace_bytes(10 * CHUNK_TOKENS, 2, HIDDEN, INTER, 2) == workspace_bytes(CHUNK_TOKENS, 2, HIDDEN, INTER, 2)
