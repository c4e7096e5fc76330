"""A store knows whose it is: another checkpoint's store is refused (or replaced when asked), a conversion
never writes over other files, runs out of space cleanly, and two writers of one directory do not mix."""
import errno
import os
import subprocess
import sys

import pytest

from klotski import LLM, SamplingParams
from klotski.checkpoint import SafetensorsIndex
from klotski.store import (MANIFEST_NAME, ExpertStore, IdentityMismatchError, StoreError, StoreIncompleteError,
                           checkpoint_identity, convert_checkpoint)
from klotski.store.directory import LOCK_NAME

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
DISK = dict(gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2, batch_size=1)  # experts on disk


@pytest.fixture(scope="module")
def two_models(checkpoints):
    """Model A and model B: same architecture, shapes and names, other weights; B's resident tokens."""
    a, _ = checkpoints.get("mixtral")
    b, _ = checkpoints.get("mixtral", seed=1)
    ref_b = [o.token_ids for o in LLM(b, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return a, b, ref_b


def test_identity_tells_same_shaped_checkpoints_apart(two_models, tmp_path):
    a, b, _ = two_models
    ia, ib = checkpoint_identity(SafetensorsIndex(a)), checkpoint_identity(SafetensorsIndex(b))
    assert ia["tensors_sha256"] == ib["tensors_sha256"] and ia["config_sha256"] == ib["config_sha256"]
    assert ia["fingerprint"] != ib["fingerprint"] and ia["content_sha256"] != ib["content_sha256"]
    assert checkpoint_identity(SafetensorsIndex(a)) == ia  # deterministic


def test_other_models_store_is_refused_then_rebuilt_on_request(two_models, tmp_path):
    a, b, ref_b = two_models
    off = tmp_path / "off"
    convert_checkpoint(a, off)
    with pytest.raises(IdentityMismatchError) as e:
        LLM(b, device="cpu", policy="klotski", offload_dir=str(off), **DISK)
    assert os.path.abspath(a) in str(e.value) and os.path.abspath(b) in str(e.value)
    assert ExpertStore(off).identity["model_dir"] == os.path.abspath(a)  # refused, nothing touched
    llm = LLM(b, device="cpu", policy="klotski", offload_dir=str(off), rebuild_store=True, **DISK)
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    assert llm.metrics.extra["bytes_disk_read"] > 0
    llm.close()
    assert out == ref_b
    assert ExpertStore(off).identity["model_dir"] == os.path.abspath(b)


def test_convert_over_other_store_refused_and_replace_removes_stale_files(checkpoints, two_models, tmp_path):
    a, _, _ = two_models
    deep, _ = checkpoints.get("mixtral", num_hidden_layers=3, seed=2)
    out = tmp_path / "s"
    convert_checkpoint(deep, out)
    (out / "klotski_prefetch.npz").write_bytes(b"a table of the other model")
    (out / "user-notes.txt.bak").write_text("not ours")
    assert (out / "experts-layer002.bin").exists()
    with pytest.raises(IdentityMismatchError, match="holds the expert store of"):
        convert_checkpoint(a, out)
    assert ExpertStore(out).num_experts == 4 and (out / "experts-layer002.bin").exists()
    convert_checkpoint(a, out, replace=True)
    names = set(os.listdir(out))
    assert "experts-layer002.bin" not in names and "klotski_prefetch.npz" not in names  # stale files gone
    assert "user-notes.txt.bak" in names  # never a file that is not Klotski's
    assert not [n for n in names if n.endswith(".tmp")]
    assert ExpertStore(out, expect_identity=checkpoint_identity(SafetensorsIndex(a))).verify() == 8
    convert_checkpoint(a, out)  # the same checkpoint again: fine


def test_convert_refuses_a_non_store_directory(two_models, tmp_path):
    a, _, _ = two_models
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="not empty and holds no Klotski store"):
        convert_checkpoint(a, user)
    assert (user / "config.json").read_text() == '{"mine": true}' and sorted(os.listdir(user)) == ["config.json"]
    from klotski.cli import main

    assert main(["convert", a, str(user)]) == 2


def test_empty_or_foreign_offload_dir_is_refused(two_models, tmp_path, monkeypatch):
    a, _, _ = two_models
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="non-empty path"):
        LLM(a, device="cpu", policy="klotski", offload_dir="", **DISK)
    with pytest.raises(ValueError, match="holds no Klotski store .*config.json"):
        LLM(a, device="cpu", policy="klotski", offload_dir=str(tmp_path), **DISK)
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_directory_with_only_an_older_klotski_table_is_ours(tmp_path):
    from klotski.store import OffloadDir

    d = tmp_path / "old"
    d.mkdir()
    (d / "klotski_prefetch.npz").write_bytes(b"table")
    assert OffloadDir(d).foreign_entries() == []
    (d / "notes.txt").write_text("mine")
    assert OffloadDir(d).foreign_entries() == ["notes.txt"]


def test_legacy_store_without_identity_is_refused(two_models, tmp_path):
    import json

    a, _, _ = two_models
    out = tmp_path / "s"
    convert_checkpoint(a, out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    del m["source"]["identity"]
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(IdentityMismatchError, match="no recorded identity"):
        LLM(a, device="cpu", policy="klotski", offload_dir=str(out), **DISK)


def test_not_enough_space_is_refused_before_writing(two_models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    a, _, _ = two_models
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
    out = tmp_path / "s"
    with pytest.raises(StoreError, match=r"not enough free space .* needs .* 4.0 KiB free"):
        convert_checkpoint(a, out)
    assert sorted(os.listdir(out)) == [LOCK_NAME]


def test_disk_full_during_convert_leaves_nothing_half_written(two_models, tmp_path, monkeypatch):
    from klotski.store import convert

    a, _, _ = two_models
    out = tmp_path / "s"
    real_write, calls = convert._AtomicFile.write, []

    def write(self, data):
        calls.append(len(data))
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(convert._AtomicFile, "write", write)
    with pytest.raises(StoreError, match="filled up"):
        convert_checkpoint(a, out)
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # no .tmp, no layer file, no manifest
    with pytest.raises(StoreIncompleteError):
        ExpertStore(out)
    monkeypatch.undo()
    convert_checkpoint(a, out)
    assert ExpertStore(out).verify() == 8


def test_interrupted_convert_removes_its_temporary_file(two_models, tmp_path, monkeypatch):
    from klotski.store import convert

    a, _, _ = two_models
    out = tmp_path / "s"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_safetensors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(a, out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")] and not (out / MANIFEST_NAME).exists()


CONVERT = "import sys; from klotski.store import convert_checkpoint; convert_checkpoint(sys.argv[1], sys.argv[2])"


def test_two_converters_of_different_models_do_not_mix(two_models, tmp_path):
    a, b, _ = two_models
    out = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, m, str(out)], stderr=subprocess.PIPE, text=True)
             for m in (a, b)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results  # one wins, the other is refused (it waited for the lock)
    loser = next(err for rc, err in results if rc != 0)
    assert "IdentityMismatchError" in loser and "holds the expert store of" in loser
    winner = a if results[0][0] == 0 else b
    store = ExpertStore(out, expect_identity=checkpoint_identity(SafetensorsIndex(winner)))
    assert store.verify() == 8


def test_two_converters_of_one_model_both_succeed(two_models, tmp_path):
    a, _, _ = two_models
    out = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, a, str(out)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert ExpertStore(out).verify() == 8 and not [n for n in os.listdir(out) if n.endswith(".tmp")]
