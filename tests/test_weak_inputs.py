"""Weak inputs get a clear error naming the problem (CLI: one line, exit 2), never a traceback or silence."""
import json
import math
import os
import shutil

import pytest

from klotski import LLM, SamplingParams
from klotski.cli import main
from klotski.units import parse_bytes

SP = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
OFF = dict(policy="klotski", gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2, batch_size=1)


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints.get("mixtral")[0]


@pytest.fixture(scope="module")
def llm(model):
    llm = LLM(model, device="cpu")
    yield llm
    llm.close()


def copy_with(model, tmp_path, **files):
    out = tmp_path / "model"
    shutil.copytree(model, out)
    for name, text in files.items():
        (out / name.replace("_", ".")).write_text(text)
    return str(out)


def test_config_that_is_a_json_list(model, tmp_path):
    path = copy_with(model, tmp_path, config_json="[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: .*JSON object, got a JSON list"):
        LLM(path, device="cpu")


def test_top_k_above_the_number_of_experts(model, tmp_path):
    cfg = json.loads(open(os.path.join(model, "config.json")).read())
    cfg["num_experts_per_tok"] = 9
    path = copy_with(model, tmp_path, config_json=json.dumps(cfg))
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(top_k\) must be between 1 and .* \(4\), got 9"):
        LLM(path, device="cpu")


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpu_memory="1e400", policy="klotski"), "finite number of bytes"),
    (dict(gpu_memory="lots"), "cannot parse memory size 'lots'"),  # resident too: never silently ignored
    (dict(device="tpu"), "device must be 'auto', 'cpu', 'cuda'"),
    (dict(max_num_seqs=0), "max_num_seqs must be an int >= 1"),
])
def test_bad_engine_options(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(model, **{"device": "cpu", **kwargs})


def test_memory_sizes():
    assert parse_bytes("24GiB") == 24 << 30
    for bad in ("1e400", math.inf, float("nan"), 2**70, "-3MiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_empty_prompt_list_under_every_policy(model, llm, tmp_path):
    assert llm.generate(prompt_token_ids=[], sampling_params=SP) == []
    off = LLM(model, device="cpu", offload_dir=str(tmp_path / "off"), **OFF)
    try:
        assert off.generate(prompt_token_ids=[], sampling_params=SP) == []
        assert off.generate([], sampling_params=SP) == []
    finally:
        off.close()


def test_prompt_longer_than_the_context(llm):
    with pytest.raises(ValueError, match=r"prompt 0: 250 prompt tokens \+ max_tokens 10 exceed .* 256 tokens"):
        llm.generate(prompt_token_ids=[[1] * 250], sampling_params=SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="300 tokens exceed the model's context of 256"):
        llm.logits([[1] * 300])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=2.5), "max_tokens must be an int, got float 2.5"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=float("inf")), "top_p must be a finite number"),
    (dict(stop_token_ids=["a"]), "stop_token_ids entry must be an int"),
    (dict(stop_token_ids=7), "stop_token_ids must be a list"),
    (dict(seed=1.5), "seed must be an int"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_token_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match=r"stop token id 500 outside the vocabulary \[0, 128\)"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=2, stop_token_ids=[500]))


@pytest.mark.parametrize("ids,match", [
    ([[1.0, 2.0]], "must hold ints, got float"),
    ("1 2 3", "must be a list of lists"),
    (["abc"], r"prompt_token_ids\[0\] must be a list of ints, got str"),
    ([[True, 2]], "must hold ints, got bool"),
])
def test_token_ids_are_never_coerced(llm, ids, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt_token_ids=ids, sampling_params=SP)


def test_lone_surrogate_and_corrupt_tokenizer(model, tmp_path):
    import hf_models

    path = copy_with(model, tmp_path)
    hf_models.write_tokenizer(path)
    llm = LLM(path, device="cpu")
    assert llm.generate("ab", SP)[0].token_ids
    with pytest.raises(ValueError, match="prompt 1 is not valid Unicode text: surrogates not allowed at character 1"):
        llm.generate(["ok", "a\ud800b"], SP)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {"type": "nonsense"}')
    with pytest.raises(ValueError, match=r"tokenizer.json: cannot load the tokenizer"):
        LLM(path, device="cpu")


def test_manifest_record_without_tensors(model, tmp_path):
    from klotski.store import ExpertStore, StoreError, convert_checkpoint

    out = tmp_path / "s"
    convert_checkpoint(model, out)
    m = json.loads((out / "manifest.json").read_text())
    del m["experts"][3]["tensors"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"malformed expert record .*KeyError: 'tensors'"):
        ExpertStore(out)


def test_non_expert_file_checksum_is_recorded_and_checked(model, tmp_path):
    from klotski.store import ChecksumError, ExpertStore, convert_checkpoint

    out = tmp_path / "s"
    m = convert_checkpoint(model, out)
    assert m["files"]["non_expert.safetensors"]["checksum"].startswith("crc32:")
    store = ExpertStore(out)
    store.verify()
    with open(store.non_expert_path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="non_expert.safetensors"):
        store.verify()


def test_finished_store_on_a_read_only_directory_is_used(model, tmp_path, monkeypatch):
    """A finished store needs no write access (simulated: tests run as root, where permission bits do not
    bind): no probe, no lock file created, the run completes."""
    import tempfile

    from klotski.store import convert_checkpoint
    from klotski.store.directory import LOCK_NAME, OffloadDir

    out = tmp_path / "ro"
    convert_checkpoint(model, out)
    os.remove(out / LOCK_NAME)
    before = sorted(os.listdir(out))
    monkeypatch.setattr(OffloadDir, "writable", property(lambda self: False))

    def refuse(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    ref = LLM(model, device="cpu").generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SP)
    llm = LLM(model, device="cpu", offload_dir=str(out), **OFF)
    with pytest.warns(UserWarning, match="could not save the prefetch table"):
        out_ids = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SP)
    llm.close()
    assert [o.token_ids for o in out_ids] == [o.token_ids for o in ref]
    assert sorted(os.listdir(out)) == before


@pytest.mark.parametrize("argv,match", [
    (["plan", "--preset", "nope-8x7b", "--hardware", "rtx3090"], "unknown model preset 'nope-8x7b'"),
    (["plan", "--preset", "mixtral-8x7b", "--hardware", "tpu9"], "unknown hardware preset 'tpu9'"),
    (["plan", "--preset", "mixtral-8x7b", "--hardware", "rtx3090", "--gpu-memory", "100TiB"],
     "more than the 24.0 GiB of device memory"),
])
def test_cli_plan_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err
