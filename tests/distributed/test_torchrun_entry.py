"""``torchrun -m klotski.distributed`` on 2 CPU ranks (gloo) prints the resident run's greedy outputs."""
import json
import os
import signal
import subprocess
import sys

import pytest

from klotski import LLM, SamplingParams
from klotski.demo import build_demo_checkpoint

PROMPTS = ["def main():\n    ", "    return self.", "# Copyright"]


def test_torchrun_two_ranks_match_resident(tmp_path):
    model = build_demo_checkpoint(str(tmp_path / "m"), size="tiny")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "klotski.distributed", "--model", model, "--max-tokens", "4", "--ignore-eos", "--slices", "2",
           "--device", "cpu", "--json", str(out)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    # its own session, so a hang kills torchrun and both ranks (never left behind)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("torchrun -m klotski.distributed did not finish in 120 s: deadlock or hang")
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads(out.read_text())
    with LLM(model, device="cpu", dtype="float32") as llm:
        ref = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert got["outputs"] == [r.token_ids for r in ref]
    assert got["world_size"] == 2 and all(m["peak_slots"] <= 2 for m in got["ranks"])
    assert sum(m["host_bytes"] for m in got["ranks"]) > 0
    assert "--- prompt: '# Copyright'" in stdout


def test_entry_outside_torchrun_says_how_to_launch(monkeypatch):
    from klotski.distributed.__main__ import cli

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node"):
        cli(["--model", "nowhere", "--prompt", "a"])


def test_generate_nproc_builds_the_torchrun_command_and_refuses_single_device_options():
    from klotski.cli import build_parser
    from klotski.distributed.launch import torchrun_command

    parse = lambda *extra: build_parser().parse_args(["generate", "--model", "M", "--prompt", "a", "--prompt", "b c",  # noqa: E731
                                                      "--nproc", "2", "--max-tokens", "5", *extra])
    cmd = torchrun_command(parse("--device", "cpu", "--ignore-eos", "--seed", "3"))
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert cmd[cmd.index("-m", 2) + 1] == "klotski.distributed"
    for flag, value in (("--model", "M"), ("--max-tokens", "5"), ("--device", "cpu"), ("--seed", "3")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--ignore-eos" in cmd and cmd.count("--prompt") == 2 and cmd[-1] == "b c"
    with pytest.raises(ValueError, match="--policy klotski is a single-device policy"):
        torchrun_command(parse("--policy", "klotski"))
    with pytest.raises(ValueError, match="does not support --offload-dir, --expert-selection"):
        torchrun_command(parse("--offload-dir", "/x", "--expert-selection", "lynx:0.5"))
