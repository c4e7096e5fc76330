"""In-process checks of the FSE-DP executor on a gloo world of one: bad settings are refused with their name,
and a single rank (every slice loaded by itself, nothing forwarded) equals the resident run."""
import pytest
import torch
import torch.distributed as dist

from klotski.checkpoint import SafetensorsIndex
from klotski.distributed.model import DistributedModel
from klotski.distributed.run import generate_on_rank, logits_on_rank
from klotski.generation import generate_batch
from klotski.model import ModelSpec
from klotski.model.resident import ResidentModel
from klotski.model.weights import CheckpointWeights
from klotski.sampling import SamplingParams


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def weights_of(model_dir):
    spec = ModelSpec.from_pretrained(model_dir)
    return CheckpointWeights(SafetensorsIndex(model_dir), spec)


def test_needs_an_initialised_process_group(checkpoints):
    model_dir, _ = checkpoints.get("mixtral")
    with pytest.raises(RuntimeError, match="torchrun"):
        DistributedModel(weights_of(model_dir), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kwargs,match", [(dict(num_slices=0), "num_slices"), (dict(num_slices=49), "num_slices"),
                                          (dict(slots=0), "slots"), (dict(loader="nearest"), "loader")])
def test_bad_settings_are_refused(checkpoints, world_of_one, kwargs, match):
    model_dir, _ = checkpoints.get("mixtral")  # intermediate 48: at most 48 slices
    with pytest.raises(ValueError, match=match):
        DistributedModel(weights_of(model_dir), torch.device("cpu"), torch.float32, **kwargs)


def test_single_rank_equals_resident(checkpoints, world_of_one):
    model_dir, _ = checkpoints.get("qwen2_moe")  # shared expert, a dense layer between MoE layers
    w = weights_of(model_dir)
    model = DistributedModel(w, torch.device("cpu"), torch.float32, num_slices=5, slots=2)
    ref = ResidentModel(w, torch.device("cpu"), torch.float32)
    prompts = [[3, 9, 27, 81, 5], [7, 1]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = generate_on_rank(model, prompts, params, w.spec.eos_token_ids)
    want = generate_batch(ref, prompts, [params] * 2, w.spec.eos_token_ids, torch.Generator())
    assert got == want
    for a, b in zip(logits_on_rank(model, prompts), [ref.forward(torch.tensor([p]), ref.new_cache(
            1, len(p), torch.zeros(1, dtype=torch.long)), all_logits=True)[0] for p in prompts]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    m = model.metrics()
    assert m["d2d_bytes_sent"] == 0 and m["peak_slots"] <= 2
    assert m["host_bytes"] == m["replicated_host_bytes"] > 0  # one rank: it reads what it needs, once per layer
