"""The runtime loads disk-resident weights by one native call per record (klotski.io.load_record) unless told
otherwise, on every read engine, with the resident engine's tokens; the torch path stays selectable."""
import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.io import io_uring_info
from klotski.runtime.disk_loads import DEFAULT_ENGINE, DEFAULT_PATH, resolve_load_options

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BUDGET = ("700KiB", "100KiB")  # experts and attention from disk (bf16 weights)
LOADS = [("native", "sync"), ("native", "threads"), ("torch", "sync")]
LOADS += [("native", "uring")] if io_uring_info()["available"] else []


@pytest.fixture(scope="module")
def bf16_mixtral(checkpoints):
    """A bf16 checkpoint: the CPU runtime computes in fp32, so native loads widen bf16 -> fp32 in C++."""
    path, _ = checkpoints.get("mixtral", dtype="bfloat16")
    with LLM(path, device="cpu", policy="resident") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def _run(path, tmp_path, monkeypatch, load, offload_dir=True, device="cpu", policy="klotski"):
    monkeypatch.setenv("KLOTSKI_LOAD_PATH", load[0])
    monkeypatch.setenv("KLOTSKI_LOAD_ENGINE", load[1])
    kw = {"offload_dir": str(tmp_path / "off")} if offload_dir else {}
    with LLM(path, device=device, policy=policy, gpu_memory=BUDGET[0], cpu_memory=BUDGET[1], num_batches=2,
             batch_size=2, **kw) as llm:
        out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        loads = llm.executor.w.disk_loads
        assert (loads.path, loads.engine) == load and loads.reader.engine == ("threads" if load[1] == "sync" else load[1])
        return out, llm.metrics.extra


@pytest.mark.parametrize("load", LOADS, ids=["/".join(x) for x in LOADS])
def test_store_records_take_the_configured_path(bf16_mixtral, tmp_path, monkeypatch, load):
    path, ref = bf16_mixtral
    out, m = _run(path, tmp_path, monkeypatch, load)
    assert out == ref
    assert m["bytes_disk_read"] > 0
    if load[0] == "native":
        assert m["disk_loads_native"] > 0 and m["disk_loads_torch"] == 0
    else:
        assert m["disk_loads_torch"] > 0 and m["disk_loads_native"] == 0


def test_checkpoint_tensors_without_a_store_load_natively(bf16_mixtral, tmp_path, monkeypatch):
    """No offload_dir: streamed tensors and experts are read from the checkpoint's own files, one call each."""
    path, ref = bf16_mixtral
    out, m = _run(path, tmp_path, monkeypatch, ("native", "sync"), offload_dir=False)
    assert out == ref
    assert m["disk_loads_native"] > 0 and m["disk_loads_torch"] == 0


def test_defaults_and_bad_options(monkeypatch):
    monkeypatch.delenv("KLOTSKI_LOAD_PATH", raising=False)
    monkeypatch.delenv("KLOTSKI_LOAD_ENGINE", raising=False)
    assert resolve_load_options() == (DEFAULT_PATH, DEFAULT_ENGINE) == ("native", "threads")
    monkeypatch.setenv("KLOTSKI_LOAD_ENGINE", "URING")
    assert resolve_load_options() == ("native", "uring")
    assert resolve_load_options("torch", "threads") == ("torch", "threads")
    with pytest.raises(ValueError, match=r"load engine \(KLOTSKI_LOAD_ENGINE\) must be one of sync, threads, uring"):
        monkeypatch.setenv("KLOTSKI_LOAD_ENGINE", "aio")
        resolve_load_options()
    with pytest.raises(ValueError, match=r"load path \(argument\) must be one of native, torch, got 'gds'"):
        resolve_load_options("gds")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("load", [("native", "sync"), ("torch", "sync")], ids=["native", "torch"])
def test_cuda_disk_loads_on_the_lane_stream(checkpoints, tmp_path, monkeypatch, load):
    """On CUDA the native path copies on the loader lane's stream (bf16 store -> bf16 pool: bytes as stored)
    and gives the resident engine's tokens."""
    import klotski.runtime.disk_loads as disk_loads

    path, _ = checkpoints.get("mixtral", dtype="bfloat16")
    with LLM(path, device="cuda", dtype="bfloat16", policy="resident") as llm:
        ref = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    streams = []
    real = disk_loads.load_record

    def spy(*args, stream=None, **kw):
        streams.append(stream.cuda_stream)
        return real(*args, stream=stream, **kw)

    monkeypatch.setattr(disk_loads, "load_record", spy)
    out, m = _run(path, tmp_path, monkeypatch, load, device="cuda")
    assert out == ref
    assert m[f"disk_loads_{load[0]}"] > 0
    if load[0] == "native":  # every native load ran on a loader lane's stream, none on the compute stream
        assert len(streams) == m["disk_loads_native"]
        assert torch.cuda.default_stream().cuda_stream not in streams


def test_int4_records_load_natively_with_the_torch_paths_tokens(checkpoints, tmp_path, monkeypatch):
    """An int4 store's records (codes, scales, zero points) go to the int4 pool slots as stored, in one call."""
    import int4_models
    from klotski.store import convert_checkpoint

    path, _ = checkpoints.get("mixtral")
    store = tmp_path / "store"
    convert_checkpoint(path, store, quantize="int4", group_size=8, symmetric=False)
    gpu, cpu = int4_models.tight_budgets(path, "klotski", str(store))
    outs = {}
    for load_path in ("native", "torch"):
        monkeypatch.setenv("KLOTSKI_LOAD_PATH", load_path)
        with LLM(path, device="cpu", dtype="float32", policy="klotski", gpu_memory=gpu, cpu_memory=cpu,
                 offload_dir=str(store), num_batches=2, batch_size=2, quantization="int4") as llm:
            outs[load_path] = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
            m = llm.metrics.extra
        other = "torch" if load_path == "native" else "native"
        assert m[f"disk_loads_{load_path}"] > 0 and m[f"disk_loads_{other}"] == 0
    assert outs["native"] == outs["torch"]
