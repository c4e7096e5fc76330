"""The Triton kernels compiled for a CUDA GPU (skipped without one): bf16 against an fp32 reference, fp16 and
fp32, the two-call accumulation the runtime relies on, a model-sized shape, and a CUDA-graph replay."""
import itertools

import pytest
import torch

from klotski.triton_kernels import fused_moe, fused_moe_torch, invoke_fused_moe, moe_align_block_size
from klotski.triton_kernels import moe_align_block_size_torch
from moe_testing import make_problem, rel_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("compiled_kernels", "poisoned_allocations"),
]

HIDDEN, INTER = 96, 200
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(m, e, k) for m, e, k in itertools.product((1, 7, 33, 130), (4, 8, 60), (1, 2, 6)) if k <= e]
SLOT_KINDS = ("identity", "permuted", "missing")


@pytest.fixture
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def reference(problem, activation="silu", out=None):
    ref_out = None if out is None else out.float().clone()
    return fused_moe_torch(*problem.upcast().args(), out=ref_out, activation=activation)


@pytest.mark.parametrize("slots", SLOT_KINDS)
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[f"M{m}-E{e}-k{k}" for m, e, k in SHAPES])
def test_bf16_matches_fp32_reference(case, slots):
    num_tokens, num_experts, top_k = SHAPES[case]
    activation = ("silu", "gelu")[case % 2]
    problem = make_problem(num_tokens, num_experts, top_k, HIDDEN, INTER, torch.bfloat16, slots, seed=case,
                           device="cuda")
    tri_out = fused_moe(*problem.args(), activation=activation)
    assert tri_out.dtype == torch.bfloat16 and tri_out.is_cuda
    assert rel_error(tri_out, reference(problem, activation)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 8, 2), (130, 60, 6)], ids=["M7-E8-k2", "M130-E60-k6"])
def test_fp32_fp16(shape, dtype):
    problem = make_problem(*shape, HIDDEN, INTER, dtype, "missing", seed=1, device="cuda")
    assert rel_error(fused_moe(*problem.args()), reference(problem)) <= TOLERANCE[dtype]


def test_align_matches_reference_on_cuda():
    problem = make_problem(130, 60, 6, 8, 8, slots="missing", seed=2, device="cuda")
    args = (problem.topk_ids, 16, 60, problem.expert_slots)
    for tri, ref in zip(moe_align_block_size(*args), moe_align_block_size_torch(*args)):
        assert torch.equal(tri.cpu(), ref.cpu())


def test_hot_then_cold_accumulates_in_fp32():
    problem = make_problem(33, 8, 2, HIDDEN, INTER, torch.bfloat16, "permuted", seed=3, device="cuda",
                           unused_experts=0)
    cold = torch.tensor([0, 5], device="cuda")
    hot_slots, cold_slots = problem.expert_slots.clone(), torch.full_like(problem.expert_slots, -1)
    hot_slots[cold] = -1
    cold_slots[cold] = problem.expert_slots[cold]
    out = torch.zeros(33, HIDDEN, device="cuda")
    fused_moe(*problem.args(expert_slots=hot_slots), out=out)
    fused_moe(*problem.args(expert_slots=cold_slots), out=out)
    assert rel_error(out, reference(problem)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("num_tokens", [1, 64, 1024])
def test_model_sized_bf16(num_tokens):
    """DeepSeek-V2-Lite expert shapes (H 2048, I 1408, E 64, k 6) with the packaged or default configs."""
    problem = make_problem(num_tokens, 64, 6, 2048, 1408, torch.bfloat16, "identity", seed=4, device="cuda")
    assert rel_error(fused_moe(*problem.args()), reference(problem)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    ],
    ids=["small", "large"],
)
def test_configs_bf16(config):
    problem = make_problem(130, 8, 2, HIDDEN, INTER, torch.bfloat16, "missing", seed=5, device="cuda")
    got = invoke_fused_moe(*problem.args(), config=config)
    assert rel_error(got, reference(problem)) <= TOLERANCE[torch.bfloat16]


def test_cuda_graph_replay():
    """Capture one call (no host sync inside), then replay it on new routing copied into the static inputs."""
    shape = (33, 8, 2, HIDDEN, INTER, torch.bfloat16, "missing")
    static = make_problem(*shape, seed=6, device="cuda")
    out = torch.zeros(33, HIDDEN, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fused_moe(*static.args(), out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(*static.args(), out=out)
    for seed in (7, 8):
        fresh = make_problem(*shape, seed=seed, device="cuda")
        for name in ("hidden_states", "topk_weights", "topk_ids", "expert_slots", "w13", "w2"):
            getattr(static, name).copy_(getattr(fresh, name))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, reference(fresh)) <= TOLERANCE[torch.bfloat16]
