"""Side files never cost outputs: a failed save warns and the outputs come back; a damaged table or one of
another checkpoint is ignored with a warning and relearned; temporary names are unique per writer."""
import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from klotski import LLM, SamplingParams
from klotski.prefetch import TABLE_NAME, CorrelationPrefetcher
from klotski.store.directory import atomic_write

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
DISK = dict(gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2, batch_size=1)


@pytest.fixture(scope="module")
def model(checkpoints):
    path, _ = checkpoints.get("mixtral")
    ref = [o.token_ids for o in LLM(path, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    return path, ref


def generate(path, off, **kw):
    with_kw = {**DISK, **kw}
    llm = LLM(path, device="cpu", policy="klotski", offload_dir=str(off), **with_kw)
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    finally:
        llm.close()


def test_full_disk_when_saving_the_table_keeps_the_outputs(model, tmp_path, monkeypatch):
    path, ref = model
    off = tmp_path / "off"

    def savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.warns(UserWarning, match="could not save the prefetch table .*No space left"):
        out = generate(path, off)
    assert out == ref
    assert not [n for n in os.listdir(off) if n.endswith(".tmp")] and not (off / TABLE_NAME).exists()


def test_cli_generate_prints_outputs_when_the_table_cannot_be_saved(model, tmp_path):
    import shutil

    import hf_models

    path = str(tmp_path / "model")
    shutil.copytree(model[0], path)
    hf_models.write_tokenizer(path)
    off = tmp_path / "off"
    script = ("import sys, errno, numpy as np\n"
              "def savez(f, **a): raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "np.savez = savez\n"
              "from klotski.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "generate", "--model", path, "--prompt", "hi",
                        "--device", "cpu", "--policy", "klotski", "--gpu-memory", "700KiB", "--cpu-memory", "200KiB",
                        "--offload-dir", str(off), "--max-tokens", "3", "--ignore-eos"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens:" in r.stdout and "could not save the prefetch table" in r.stderr


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "other-shape", "other-model"])
def test_unreadable_or_foreign_table_is_ignored_and_relearned(model, tmp_path, damage):
    path, ref = model
    off = tmp_path / "off"
    assert generate(path, off) == ref  # learns and saves a table
    table = off / TABLE_NAME
    good = table.read_bytes()
    if damage == "truncated":
        table.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        table.write_bytes(b"")
    elif damage == "garbage":
        table.write_bytes(os.urandom(300))
    elif damage == "other-shape":
        CorrelationPrefetcher(4, 4).save(table)
    else:
        pf = CorrelationPrefetcher(2, 4)
        pf.record(0, [[0, 1]])
        pf.save(table, identity="0" * 64)
    with pytest.warns(UserWarning, match="ignoring the prefetch table"):
        assert generate(path, off) == ref
    pf = CorrelationPrefetcher(2, 4).load(table)  # rewritten by the run, readable again
    assert pf.popularity.sum() > 0


def test_atomic_write_is_safe_under_concurrent_writers(tmp_path):
    target = str(tmp_path / "f.bin")
    errors = []

    def writer(i):
        try:
            for j in range(50):
                atomic_write(target, lambda f: f.write(bytes([i]) * 4096))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = open(target, "rb").read()
    assert len(data) == 4096 and len(set(data)) == 1
    assert os.listdir(tmp_path) == ["f.bin"]


RUNNER = """
import sys
from klotski import LLM, SamplingParams
path, off, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
with_disk = dict(gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2, batch_size=1)
first = llm = None
for i in range(n):
    if i % 4 == 0:  # a new LLM every 4 calls: opens the store and loads the table while the other saves it
        if llm is not None:
            llm.close()
        llm = LLM(path, device="cpu", policy="klotski", offload_dir=off, **with_disk)
    out = [o.token_ids for o in llm.generate(prompt_token_ids=[[1, 2, 3], [4, 5]], sampling_params=sp)]
    first = first or out
    assert out == first, (i, out, first)
llm.close()
print("OK", n)
"""


def test_two_processes_share_one_offload_dir(model, tmp_path):
    """Two processes generating 40 times each with one offload_dir (the store's conversion, table loads and
    saves racing; each process opens 10 LLMs): every call succeeds with the same tokens, no temporary file is
    left."""
    path, _ = model
    n = 40
    off = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, path, str(off), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and f"OK {n}" in out, err[-3000:]
    assert not [x for x in os.listdir(off) if x.endswith(".tmp")]
