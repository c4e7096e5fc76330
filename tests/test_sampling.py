import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.sampling import Sampler

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints.get("mixtral")[0], device="cpu")


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    a = llm.generate(prompt_token_ids=PROMPTS, sampling_params=p)
    b = llm.generate(prompt_token_ids=PROMPTS[::-1], sampling_params=p)
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids
    c = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=1.0, max_tokens=12, seed=8, ignore_eos=True))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=8))
    top1 = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0.7, top_k=1, max_tokens=8, seed=1))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=10))
    stop_at = greedy[0].token_ids[3]
    first = greedy[0].token_ids.index(stop_at)
    out = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    assert out[0].token_ids == greedy[0].token_ids[: first + 1]  # the stop token is kept, nothing after it
    assert len(greedy[1].token_ids) == 10


def test_sampler_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    s = Sampler([p], torch.Generator().manual_seed(0))
    seen = {s.sample(logits, [0])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_sampler_distribution_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    s = Sampler([SamplingParams(temperature=1.0)], torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([s.sample(logits, [0])[0] for _ in range(3000)]), minlength=3).float()
    assert torch.allclose(counts / 3000, torch.softmax(logits[0], 0), atol=0.03)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"),
])
def test_bad_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 100000]])
    with pytest.raises(ValueError, match="exactly one of"):
        llm.generate()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        llm.generate("hello")


def test_eos_stops_unless_ignored(checkpoints):
    path, _ = checkpoints.get("mixtral")
    free = LLM(path, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=10))
    eos = free[0].token_ids[2]
    eos_path, _ = checkpoints.get("mixtral", eos_token_id=eos)
    llm = LLM(eos_path, device="cpu")
    assert llm.spec.eos_token_ids == (eos,)
    stopped = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=10))
    assert stopped[0].token_ids == free[0].token_ids[: free[0].token_ids.index(eos) + 1]
    ignored = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert ignored[0].token_ids == free[0].token_ids
