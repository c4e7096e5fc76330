"""The offloaded session's lifecycle: transactional re-plans, one LLM shared by threads, context manager and
release on garbage collection, bounded waits."""
import gc
import subprocess
import sys
import threading
import time

import pytest

from klotski import LLM, SamplingParams
from klotski.runtime import BudgetError

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3], [5, 6, 7, 8]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BUDGET = dict(gpu_memory="700KiB", cpu_memory="200KiB")


def lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("klotski-")]


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    path, _ = checkpoints.get("mixtral")
    with LLM(path, device="cpu", policy="resident") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


@pytest.fixture(scope="module")
def long_context(checkpoints):
    """The tiny Mixtral with a context long enough for the 5000-token request below (the default 256 would
    refuse it up front, before any re-plan)."""
    path, _ = checkpoints.get("mixtral", max_position_embeddings=8192)
    with LLM(path, device="cpu", policy="resident") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def test_failed_replan_leaves_llm_usable(long_context, tmp_path):
    """A request whose re-plan cannot fit (5000 tokens of KV under these budgets) raises BudgetError; the
    executor that ran before is still there and serves the next normal request."""
    path, ref = long_context
    with LLM(path, device="cpu", policy="klotski", offload_dir=str(tmp_path / "off"), **BUDGET) as llm:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref
        before = llm.executor
        # the prediction shown is for the placement that ran
        assert llm.metrics.extra["plan"]["placement"] == before.layout.placement.describe(llm.spec.num_experts)
        with pytest.raises(BudgetError):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=5000, ignore_eos=True))
        assert llm.executor is before and not before.closed
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref


class _Interrupt:
    """Wraps a class used while building an executor: its ``at``-th construction raises KeyboardInterrupt."""

    def __init__(self, cls, at: int):
        self.cls, self.at, self.calls = cls, at, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.cls(*a, **k)


@pytest.mark.parametrize("step", ["lane", "tracer"], ids=["between-lane-threads", "after-lanes"])
def test_interrupted_replan_leaves_llm_usable(mixtral, tmp_path, monkeypatch, step):
    """Ctrl-C while the re-planned executor is being built (a loader lane thread started, or all of them):
    the threads it started are stopped, the old executor stays and runs the next request."""
    import klotski.runtime.executor as executor_mod
    import klotski.runtime.loader as loader_mod

    path, ref = mixtral
    with LLM(path, device="cpu", policy="klotski", offload_dir=str(tmp_path / "off"), **BUDGET) as llm:
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
        before, threads = llm.executor, sorted(lane_threads())
        if step == "lane":  # the second lane of the new executor fails to start: the first must stop
            monkeypatch.setattr(loader_mod, "Lane", _Interrupt(loader_mod.Lane, 2))
        else:
            monkeypatch.setattr(executor_mod, "Tracer", _Interrupt(executor_mod.Tracer, 1))
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # > 2x the planned 16: re-plan
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=long)
        monkeypatch.undo()
        assert llm.executor is before and not before.closed
        assert sorted(lane_threads()) == threads
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref


def test_one_llm_many_threads(mixtral, tmp_path):
    """4 threads x 3 requests on one LLM: serialised, no hang, each request's tokens as in a sequential run."""
    path, _ = mixtral
    with LLM(path, device="cpu", policy="klotski", offload_dir=str(tmp_path / "off"), num_batches=2, batch_size=2,
             **BUDGET) as llm:
        requests = [[PROMPTS[(t + r) % len(PROMPTS)], PROMPTS[(t * r + 1) % len(PROMPTS)]]
                    for t in range(4) for r in range(3)]
        sequential = [[o.token_ids for o in llm.generate(prompt_token_ids=req, sampling_params=SP)]
                      for req in requests]
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for r in range(3):
                    i = t * 3 + r
                    results[i] = [o.token_ids for o in llm.generate(prompt_token_ids=requests[i], sampling_params=SP)]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 600
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "generate calls from several threads hung"
        assert not errors, errors
        assert [results[i] for i in range(len(requests))] == sequential


def test_context_manager_and_collection_release_threads(mixtral, tmp_path):
    path, ref = mixtral
    base = len(lane_threads())
    with LLM(path, device="cpu", policy="flexgen", num_batches=2, batch_size=2, **BUDGET) as llm:
        assert len(lane_threads()) > base
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref
    assert len(lane_threads()) == base
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    llm.close()  # idempotent

    llm = LLM(path, device="cpu", policy="klotski", num_batches=2, batch_size=2, **BUDGET)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    assert len(lane_threads()) > base
    del llm
    gc.collect()
    assert len(lane_threads()) == base


def test_pool_and_lane_waits_time_out():
    import torch

    from klotski.runtime.loader import Lane, WaitTimeout
    from klotski.runtime.pool import PoolTimeout, SlotPool

    pool = SlotPool([0], "expert pool", timeout_s=0.2)
    slot, _ = pool.acquire(pool.reserve())
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout, match="expert pool: request 1 waited 0.2 s.*0 of 1 free"):
        pool.acquire(pool.reserve())
    assert time.monotonic() - t0 < 5
    pool.release(slot)

    lane = Lane("prefetch", torch.device("cpu"), timeout_s=0.3)
    try:
        ticket = lane.submit("L0 e1", lambda ln: time.sleep(1.5))
        with pytest.raises(WaitTimeout, match="'L0 e1' on lane prefetch did not finish within 0.3 s"):
            ticket.wait()
    finally:
        lane.close()


def test_runtime_does_not_import_the_engine():
    """The engine depends on the runtime through the session protocol, never the other way round."""
    code = "import sys, klotski.runtime; assert 'klotski.engine' not in sys.modules, 'runtime imports engine'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("second", ["builds", "fails"])
def test_replan_when_the_device_cannot_hold_two_executors(mixtral, monkeypatch, second):
    """On CUDA a re-plan that runs out of device memory next to the old executor frees the old one and
    builds again; if that fails too, the old plan is rebuilt and the session keeps running it."""
    import dataclasses

    import torch

    import klotski.runtime.session as session_mod
    from klotski.runtime import OffloadedSession

    path, _ = mixtral
    with LLM(path, device="cpu") as llm:
        weights = llm.weights
    s = OffloadedSession(weights, "cpu", torch.float32, "klotski", num_batches=2, batch_size=2, **BUDGET)
    old, old_plan = s.executor, s.run_plan
    real_build, calls = session_mod.build_executor, []

    def build(cfg, rp, prefetcher):
        calls.append(rp)
        if len(calls) == 1 or (second == "fails" and len(calls) == 2):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_build(dataclasses.replace(cfg, device=torch.device("cpu")), rp, prefetcher)

    monkeypatch.setattr(session_mod, "build_executor", build)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    s.config = dataclasses.replace(s.config, device=torch.device("cuda"))
    try:
        if second == "builds":
            s.replan((4, 40))
            assert old.closed and s.executor is not old and s.run_plan.workload == (4, 40)
        else:
            with pytest.raises(torch.OutOfMemoryError):
                s.replan((4, 40))
            assert old.closed and calls[-1] is old_plan  # the old plan, rebuilt
            assert s.run_plan is old_plan and s.executor is not None and not s.executor.closed
    finally:
        s.close()
