"""Property: for any architecture, expert key layout, offloading policy and budgets between the reported
minimum and the checkpoint's size, the LLM either runs within its budgets with the resident engine's greedy
tokens, or refuses before running, naming the minimum budgets, and those minimum budgets then run."""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klotski import LLM, SamplingParams
from klotski.runtime import BudgetError

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12]]
SP = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
MAX_EXAMPLES = int(os.environ.get("KLOTSKI_PROPERTY_EXAMPLES", "8"))  # each example is one offloaded run


class Cases:
    """Per (arch, fused): the checkpoint, its size and the resident tokens; per policy the reported minimum."""

    def __init__(self, checkpoints, root):
        self.checkpoints, self.root, self.refs, self.minimum, self.runs = checkpoints, root, {}, {}, 0

    def model(self, arch, fused):
        if (arch, fused) not in self.refs:
            path, _ = self.checkpoints.get(arch, fused=fused)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
            with LLM(path, device="cpu") as llm:
                ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            self.refs[(arch, fused)] = (path, size, ref)
        return self.refs[(arch, fused)]

    def run(self, path, policy, gpu: int, cpu: int):
        self.runs += 1
        with LLM(path, device="cpu", policy=policy, gpu_memory=gpu, cpu_memory=cpu,
                 offload_dir=os.path.join(self.root, f"off-{self.runs}")) as llm:
            out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            return out, llm.metrics.extra

    def reported_minimum(self, path, policy) -> tuple[int, int]:
        """The minimum the refusals name: the runtime floor (gpu), then the planner's (gpu, cpu) there."""
        key = (path, policy)
        if key not in self.minimum:
            gpu = cpu = 1
            for _ in range(3):
                try:
                    with LLM(path, device="cpu", policy=policy, gpu_memory=gpu, cpu_memory=cpu):
                        break
                except BudgetError as e:
                    assert e.min_gpu_memory > 0 and "needs" in str(e), f"refusal names no minimum: {e}"
                    gpu, cpu = max(gpu, e.min_gpu_memory), max(cpu, e.min_cpu_memory)
            self.minimum[key] = (gpu, cpu)
        return self.minimum[key]


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory):
    return Cases(checkpoints, str(tmp_path_factory.mktemp("property")))


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHS), fused=st.booleans(), policy=st.sampled_from(("layerwise", "flexgen", "klotski")),
       g=st.floats(0.0, 1.0), c=st.floats(0.0, 1.0))
def test_accepted_budgets_run_within_them(cases, arch, fused, policy, g, c):
    path, size, ref = cases.model(arch, fused)
    gmin, cmin = cases.reported_minimum(path, policy)
    gpu = int(gmin + g * max(0, size - gmin))
    cpu = int(cmin + c * max(0, size - cmin))
    try:
        out, m = cases.run(path, policy, gpu, cpu)
    except BudgetError as e:  # refused: only while planning, naming a minimum that then runs
        assert e.min_gpu_memory > 0, f"refused while running, not planning: {e}"
        gpu, cpu = max(gpu, e.min_gpu_memory), max(cpu, e.min_cpu_memory)
        out, m = cases.run(path, policy, gpu, cpu)
    assert out == ref, (arch, fused, policy, gpu, cpu)
    assert m["peak_gpu_bytes"] <= gpu and m["peak_cpu_bytes"] <= cpu, (m["peak_gpu_bytes"], gpu, m["peak_cpu_bytes"], cpu)
