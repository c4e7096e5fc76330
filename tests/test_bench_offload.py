"""bench/e2e/bench_offload.py end to end on a tiny random checkpoint in CPU mode: the expert-selection rows
count the expert bytes of decode steps (with and without the host-compute pair beside them), and the
host-compute-off row runs klotski once more with the same tokens."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "e2e", "bench_offload.py")


@pytest.mark.parametrize("host_off", [False, True])
def test_selection_rows_count_decode_expert_bytes(tmp_path, host_off):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a bench never times the interpreter
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cmd = [sys.executable, BENCH, "--device", "cpu", "--dtype", "float32", "--layers", "2", "--hidden", "64",
           "--inter", "64", "--experts", "8", "--top-k", "2", "--vocab", "128", "--heads", "4",
           "--gpu-memory", "900KiB", "--cpu-memory", "64MiB", "--prompt-len", "8", "--gen-len", "4",
           "--num-batches", "1", "--batch-size", "8", "--num-prompts", "8", "--policies", "klotski",
           "--baseline", "none", "--hardware", "rtx3090", "--expert-selection", "off,lynx:1.0",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    if host_off:
        cmd.append("--host-compute-off")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = [os.path.join(tmp_path / "out", f) for f in os.listdir(tmp_path / "out") if f.endswith(".json")]
    rows = json.load(open(path))["rows"]
    sel = {r["expert_selection_setting"]: r for r in rows if "expert_selection_setting" in r}
    assert set(sel) == {"off", "lynx:1.0"}
    assert sel["off"]["decode_steps"] > 0 and sel["off"]["expert_bytes_per_decode_step"] > 0
    assert sel["lynx:1.0"]["expert_bytes_per_decode_step"] <= sel["off"]["expert_bytes_per_decode_step"]
    assert [r["host_compute"] for r in rows if r["policy"] == "klotski" and "expert_selection_setting" not in r] \
        == (["auto", "off"] if host_off else ["auto"])
