"""Offloaded policies produce the resident engine's greedy tokens under budgets that force every tier."""
import os
import threading

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.runtime import BudgetError
from klotski.units import parse_bytes

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3], [5, 6, 7, 8]]
SP = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# (gpu_memory, cpu_memory): unlimited; experts split gpu/cpu; experts from disk; attention streamed too
BUDGETS = [(None, None), ("900KiB", "300KiB"), ("700KiB", "200KiB"), ("560KiB", "120KiB")]


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    path, _ = checkpoints.get("mixtral")
    ref = [o.token_ids for o in LLM(path, device="cpu", policy="resident").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def run(path, policy, tmp_path, gpu=None, cpu=None, **kw):
    llm = LLM(path, device="cpu", policy=policy, gpu_memory=gpu, cpu_memory=cpu,
              offload_dir=str(tmp_path / f"off-{policy}"), num_batches=kw.pop("num_batches", 2),
              batch_size=kw.pop("batch_size", 2), **kw)
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return llm, out


@pytest.mark.parametrize("policy", ["klotski", "flexgen", "layerwise"])
@pytest.mark.parametrize("budget", BUDGETS, ids=["unlimited", "gpu+cpu", "disk", "tight"])
def test_policy_matches_resident(mixtral, tmp_path, policy, budget, klotski_own_order):
    path, ref = mixtral
    llm, out = run(path, policy, tmp_path, *budget)
    m = llm.metrics.extra
    llm.close()
    assert out == ref
    for tier, b in zip(("gpu", "cpu"), budget):
        if b is not None:
            assert m[f"peak_{tier}_bytes"] <= parse_bytes(b)
    if budget[1] in ("200KiB", "120KiB"):
        assert m["bytes_disk_read"] > 0 and m["weights_per_tier"]["disk"] > 0
    if budget[0] is not None:  # the planner's plan ran, with its prediction next to the measurement
        assert m["predicted_tokens_per_s"] > 0 and "experts(gpu/cpu/disk)" in m["plan"]["placement"]
    if policy == "klotski" and budget[0] is not None:
        assert m["prefetch_predictions"] > 0


def test_kv_in_host_memory_and_trace(mixtral, tmp_path):
    path, ref = mixtral
    llm, out = run(path, "klotski", tmp_path, "700KiB", "400KiB", )
    llm.close()
    assert out == ref
    llm = LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="400KiB", num_batches=2,
              batch_size=2)
    from klotski.runtime import OffloadedSession

    llm.session.close()
    llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, "klotski", "700KiB", "400KiB",
                                   None, num_batches=2, batch_size=2, kv="cpu")
    ex = llm.executor
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    m = llm.metrics.extra
    assert out == ref
    assert m["kv_tier"] == "cpu" and m["bytes_kv_h2d"] > 0 and m["bytes_kv_d2h"] > 0
    assert 0.0 <= m["bubble_fraction"] < 1.0
    ex.write_trace(str(tmp_path / "t.json"))
    assert os.path.getsize(tmp_path / "t.json") > 100
    ex.close()


def test_qwen2_moe_dense_layer_and_shared_expert(checkpoints, tmp_path):
    path, _ = checkpoints.get("qwen2_moe")
    ref = [o.token_ids for o in LLM(path, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    for policy in ("klotski", "flexgen"):
        llm, out = run(path, policy, tmp_path, "1200KiB", "300KiB")
        llm.close()
        assert out == ref, policy


def test_budget_too_small_names_minimum(mixtral):
    path, _ = mixtral
    with pytest.raises(BudgetError, match="too small for one layer's working set.*needs at least"):
        LLM(path, device="cpu", policy="flexgen", gpu_memory="100KiB", cpu_memory="1MiB")


def test_unwritable_offload_dir(mixtral, tmp_path):
    path, _ = mixtral
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="offload_dir"):
        LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB",
            offload_dir=str(blocker / "sub"))


def test_corrupt_store_names_tensor(mixtral, tmp_path):
    from klotski.store import ChecksumError, ExpertStore, convert_checkpoint

    path, _ = mixtral
    store_dir = tmp_path / "store"
    convert_checkpoint(path, store_dir)
    rec = ExpertStore(store_dir).expert(0, 1)
    with open(rec.path, "r+b") as f:
        f.seek(rec.offset + rec.w2.offset + 3)
        b = f.read(1)
        f.seek(rec.offset + rec.w2.offset + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    llm = LLM(path, device="cpu", policy="layerwise", gpu_memory="700KiB", cpu_memory="200KiB",
              offload_dir=str(store_dir))
    with pytest.raises(ChecksumError, match="layer 0 expert 1 w2"):
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    llm.close()


def test_interrupt_leaves_reusable_llm(mixtral, tmp_path):
    path, ref = mixtral
    llm = LLM(path, device="cpu", policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB",
              offload_dir=str(tmp_path / "off"), num_batches=2, batch_size=2)
    ex = llm.executor
    real, calls = ex.experts_fn, [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    ex.experts_fn = flaky
    threads = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    assert ex.lanes.idle and ex.w.pool.slots.in_use == 0
    assert threading.active_count() == threads
    ex.experts_fn = real
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    assert out == ref
    llm.close()
    assert not any(lane.alive for lane in ex.lanes.lanes.values())
