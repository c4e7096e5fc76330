"""Bad input gives a clear ValueError, from the Triton path and the torch reference alike."""
import pytest
import torch

from klotski.triton_kernels import fused_moe, fused_moe_torch, moe_align_block_size, moe_align_block_size_torch
from moe_testing import make_problem

pytestmark = pytest.mark.usefixtures("triton_interpret")

H, I = 32, 48


def bad_inputs():
    """(name, kwargs overriding fused_moe's arguments, expected message fragment)."""
    p = make_problem(5, 4, 2, H, I, slots="permuted", seed=0)
    slots = p.expert_slots
    return [
        ("w2 I mismatch", dict(w2=torch.randn(6, H, I + 1)), "w2 must have shape"),
        ("hidden H mismatch", dict(hidden_states=torch.randn(5, H + 1)), "w13 must have shape"),
        ("M mismatch", dict(topk_ids=p.topk_ids[:4].contiguous()), "topk_ids must have shape"),
        ("weights shape", dict(topk_weights=p.topk_weights[:, :1].contiguous()), "topk_weights shape"),
        ("k > E", dict(topk_ids=torch.zeros(5, 5, dtype=torch.int32), topk_weights=torch.ones(5, 5)), "top_k"),
        ("slot out of range", dict(expert_slots=torch.tensor([0, 1, 2, 6], dtype=torch.int32)), "expert_slots must lie"),
        ("slot below -1", dict(expert_slots=torch.tensor([0, 1, -2, 3], dtype=torch.int32)), "expert_slots must lie"),
        ("expert id out of range", dict(topk_ids=torch.full((5, 2), 4, dtype=torch.int32)), "topk_ids must lie"),
        ("slot table length", dict(expert_slots=slots[:3].contiguous()), "must lie in \\[0, 3\\) \\(num_experts = len"),
        ("slot table 2-D", dict(expert_slots=slots.reshape(2, 2)), "1-D"),
        ("slot table float", dict(expert_slots=slots.float()), "expert_slots must be int32 or int64"),
        ("w2 transposed view", dict(w2=torch.randn(6, I, H).transpose(1, 2)), "unit stride"),
        ("non-contiguous ids", dict(topk_ids=torch.zeros(2, 5, dtype=torch.int32).t()), "topk_ids must be contiguous"),
        ("dtype mix", dict(w13=p.w13.half()), "w13 dtype must match"),
        ("int hidden", dict(hidden_states=torch.ones(5, H, dtype=torch.int32)), "hidden_states dtype"),
        ("float ids", dict(topk_ids=p.topk_ids.float()), "topk_ids must be int32 or int64"),
        ("int weights", dict(topk_weights=p.topk_ids), "topk_weights must be a float tensor"),
        ("odd w13", dict(w13=torch.randn(6, 2 * I + 1, H)), "w13.shape\\[1\\]"),
        ("out shape", dict(out=torch.zeros(5, H + 1)), "out must have shape"),
        ("out dtype", dict(out=torch.zeros(5, H, dtype=torch.float16)), "out dtype"),
        ("out non-contiguous", dict(out=torch.zeros(H, 5).t()), "out must be contiguous"),
        ("activation", dict(activation="relu"), "activation must be one of"),
    ]


CASES = bad_inputs()


@pytest.mark.parametrize("impl", [fused_moe, fused_moe_torch], ids=["tri", "ref"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_raises_value_error(impl, case):
    _, overrides, message = CASES[case]
    p = make_problem(5, 4, 2, H, I, slots="permuted", seed=0)
    kwargs = dict(hidden_states=p.hidden_states, w13=p.w13, w2=p.w2, topk_weights=p.topk_weights,
                  topk_ids=p.topk_ids, expert_slots=p.expert_slots)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        impl(**kwargs)


@pytest.mark.parametrize("align", [moe_align_block_size, moe_align_block_size_torch], ids=["tri", "ref"])
def test_bad_align_input_raises_value_error(align):
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size"):
        align(ids, 0, 4)
    with pytest.raises(ValueError, match="topk_ids must lie"):
        align(ids, 16, 3)
    with pytest.raises(ValueError, match="top_k"):
        align(ids, 16, 1)
    with pytest.raises(ValueError, match="2-D"):
        align(ids.reshape(-1), 16, 4)
    with pytest.raises(ValueError, match="expert_slots must have shape"):
        align(ids, 16, 4, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_slots must lie"):
        align(ids, 16, 4, torch.tensor([0, 1, 2, -3], dtype=torch.int32))


def test_check_values_false_skips_only_the_value_ranges():
    from klotski.triton_kernels import invoke_fused_moe

    p = make_problem(5, 4, 2, H, I, slots="permuted", seed=0)
    bad_slots = torch.tensor([0, 1, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_slots must lie"):
        invoke_fused_moe(*p.args(expert_slots=bad_slots))
    with pytest.raises(ValueError, match="w13 dtype must match"):  # metadata checks still run
        invoke_fused_moe(*p.args(w13=p.w13.half()), check_values=False)
    got = invoke_fused_moe(*p.args(), check_values=False)
    assert torch.allclose(got, fused_moe_torch(*p.args()), rtol=1e-5, atol=1e-5)
