"""The offloaded runtime's CUDA path (copy streams + events, pinned staging ring, Triton fused_moe over the
expert pool): every policy under budgets that force CPU and disk tiers gives the resident engine's greedy
tokens on the same GPU, and the allocator's peak stays within the device budget. Skipped without a GPU."""
import gc

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.units import parse_bytes

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3], [5, 6, 7, 8]]
SP = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# (gpu_memory, cpu_memory): experts split gpu/cpu; experts from disk; attention streamed too
BUDGETS = [("900KiB", "300KiB"), ("700KiB", "200KiB"), ("560KiB", "120KiB")]


def _generate(llm):
    return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]


@pytest.fixture(scope="module")
def mixtral_cuda(checkpoints):
    path, _ = checkpoints.get("mixtral")
    llm = LLM(path, device="cuda", dtype="float32", policy="resident")
    ref = _generate(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return path, ref


@pytest.mark.parametrize("policy", ["klotski", "flexgen", "layerwise"])
@pytest.mark.parametrize("budget", BUDGETS, ids=["gpu+cpu", "disk", "tight"])
def test_policy_matches_resident_on_cuda(mixtral_cuda, tmp_path, policy, budget):
    path, ref = mixtral_cuda
    gpu, cpu = budget
    llm = LLM(path, device="cuda", dtype="float32", policy=policy, gpu_memory=gpu, cpu_memory=cpu,
              offload_dir=str(tmp_path / "off"), num_batches=2, batch_size=2)
    try:
        out = _generate(llm)
        m = llm.metrics.extra
    finally:
        llm.close()
    assert out == ref
    assert m["peak_gpu_bytes"] <= parse_bytes(gpu), (m["peak_gpu_bytes"], gpu)
    assert m["peak_cpu_bytes"] <= parse_bytes(cpu)
    if cpu in ("200KiB", "120KiB"):
        assert m["bytes_disk_read"] > 0


def test_kv_in_host_memory_on_cuda(mixtral_cuda, tmp_path):
    """KV caches in pinned host memory: loaded and stored per micro-batch on their own streams."""
    from klotski.runtime import OffloadedSession

    path, ref = mixtral_cuda
    llm = LLM(path, device="cuda", dtype="float32", policy="klotski", gpu_memory="700KiB", cpu_memory="400KiB",
              num_batches=2, batch_size=2)
    llm.session.close()
    llm.session = OffloadedSession(llm.weights, torch.device("cuda"), torch.float32, "klotski", "700KiB", "400KiB",
                                   None, num_batches=2, batch_size=2, kv="cpu")
    try:
        out = _generate(llm)
        m = llm.metrics.extra
    finally:
        llm.close()
    assert out == ref
    assert m["kv_tier"] == "cpu" and m["bytes_kv_h2d"] > 0 and m["bytes_kv_d2h"] > 0
