"""moe_align_block_size (vectorised, ``tri_``) equals the readable loop (``ref_``) exactly, and both have
vLLM's semantics."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klotski.triton_kernels import moe_align_block_size, moe_align_block_size_torch
from moe_testing import make_problem

GRID = [(m, e, k) for m, e, k in itertools.product((1, 7, 33, 130), (4, 8, 60), (1, 2, 6)) if k <= e]


def assert_exact(tri, ref):
    for name, t, r in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), tri, ref):
        assert t.dtype == r.dtype == torch.int32, name
        assert torch.equal(t, r), f"{name}: {t.tolist()} != {r.tolist()}"


def check_semantics(topk_ids, block_size, num_experts, expert_slots, result):
    sorted_ids, expert_ids, num_post = result
    num_pairs = topk_ids.numel()
    used = int(num_post.item())
    flat = topk_ids.reshape(-1).long()
    resident = torch.ones(num_experts, dtype=torch.bool) if expert_slots is None else expert_slots >= 0
    assert used % block_size == 0
    assert torch.all(sorted_ids[used:] == num_pairs)  # tail is sentinel
    assert torch.all(expert_ids[used // block_size:] == -1)
    blocks = sorted_ids[:used].reshape(-1, block_size)
    seen = []
    for block, expert in zip(blocks, expert_ids[: used // block_size].tolist()):
        assert resident[expert]
        real = block[block < num_pairs]
        assert len(real) > 0  # no empty block: experts without tokens get none
        assert torch.all(flat[real.long()] == expert)
        assert torch.all(block[len(real):] == num_pairs)  # padding only at the end of a group
        seen += real.tolist()
    expected = [p for p in range(num_pairs) if resident[flat[p]]]
    assert sorted(seen) == expected  # every resident pair exactly once, no other pair
    assert expert_ids[: used // block_size].tolist() == sorted(expert_ids[: used // block_size].tolist())


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("slots", ["identity", "missing"])
@pytest.mark.parametrize("shape", GRID, ids=[f"M{m}-E{e}-k{k}" for m, e, k in GRID])
def test_align_matches_reference(shape, slots, block_size):
    num_tokens, num_experts, top_k = shape
    problem = make_problem(num_tokens, num_experts, top_k, 8, 8, slots=slots, seed=num_tokens * 7 + top_k)
    args = (problem.topk_ids, block_size, num_experts, problem.expert_slots)
    tri = moe_align_block_size(*args)
    ref = moe_align_block_size_torch(*args)
    assert_exact(tri, ref)
    check_semantics(*args, tri)


def test_docstring_example():
    ids = torch.tensor([[2, 0], [0, 1], [2, 3]])
    s = 6  # sentinel = number of pairs
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 4, 4)
    assert sorted_ids.tolist() == [1, 2, s, s, 3, s, s, s, 0, 4, s, s, 5, s, s, s, s, s]
    assert expert_ids.tolist() == [0, 1, 2, 3, -1] and num_post.tolist() == [16]
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 4, 4, torch.tensor([0, -1, 1, -1]))
    assert sorted_ids.tolist() == [1, 2, s, s, 0, 4, s, s] + [s] * 10
    assert expert_ids.tolist() == [0, 2, -1, -1, -1] and num_post.tolist() == [8]


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 3, 16]),
    data=st.data(),
)
def test_align_random(num_tokens, num_experts, block_size, data):
    top_k = data.draw(st.integers(1, num_experts))
    rows = [data.draw(st.permutations(range(num_experts)))[:top_k] for _ in range(num_tokens)]
    topk_ids = torch.tensor(rows, dtype=torch.int64).reshape(num_tokens, top_k)
    slot_list = data.draw(st.lists(st.integers(-1, 20), min_size=num_experts, max_size=num_experts))
    expert_slots = data.draw(st.sampled_from([None, torch.tensor(slot_list, dtype=torch.int32)]))
    args = (topk_ids, block_size, num_experts, expert_slots)
    tri = moe_align_block_size(*args)
    assert_exact(tri, moe_align_block_size_torch(*args))
    check_semantics(*args, tri)
