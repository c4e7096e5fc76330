"""The demo model's preparation survives being killed: nothing half-written looks complete, and the next run
removes what the killed one left behind (but never a running preparation's temporary)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import klotski.demo as demo

HANG = """
import os, time, klotski.demo as demo
def hang(tmp, size, seed):  # half-way through writing the model
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(b"partial")
    print("building", flush=True)
    time.sleep(120)
demo._write_random = hang
demo.ensure_demo_checkpoint("tiny", {target!r})
"""


def _start_hanging_build(target) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HANG.format(target=str(target)))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    return proc


def test_sigkilled_first_build_is_cleaned_by_the_next_run(tmp_path):
    parent = tmp_path / "cache"
    target = parent / "m"
    proc = _start_hanging_build(target)
    try:
        (tmp,) = os.listdir(parent)  # killed half-way
        assert tmp.startswith(f".m.tmp-{proc.pid}-")
        assert os.path.isfile(parent / tmp / "model.safetensors")
        # while it runs, another preparation leaves its temporary alone
        assert demo.remove_stale_temporaries(str(parent)) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists()
    path = demo.ensure_demo_checkpoint("tiny", str(target))
    assert os.listdir(parent) == ["m"]
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_legacy_temporaries_are_removed_when_old(tmp_path):
    old, fresh = tmp_path / ".demo-abcd1234", tmp_path / ".demo-efgh5678"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    hour_ago = time.time() - demo.LEGACY_STALE_S - 60
    os.utime(old, (hour_ago, hour_ago))
    (tmp_path / ".demo-notes.txt").write_text("a user's file, not a directory we made")
    assert demo.remove_stale_temporaries(str(tmp_path)) == [str(old)]
    assert sorted(os.listdir(tmp_path)) == [".demo-efgh5678", ".demo-notes.txt"]


def test_an_incomplete_model_directory_is_rebuilt(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no weights: not a finished model
    demo.ensure_demo_checkpoint("tiny", str(target))
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["m"]


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo size 'huge'"):
        demo.build_demo_checkpoint(str(tmp_path / "m"), size="huge")
