import json
import os

import pytest

from klotski.cli import main
from klotski.demo import build_demo_checkpoint
from klotski.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "m"), size="tiny")


def test_demo_compares_offloaded_policies_under_a_budget(demo_dir, tmp_path, capsys):
    trace = tmp_path / "t.json"
    rc = main(["demo", "--size", "tiny", "--model-dir", demo_dir, "--max-tokens", "4", "--device", "cpu",
               "--gpu-memory", "2MiB", "--cpu-memory", "512KiB", "--offload-dir", str(tmp_path / "off"),
               "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "greedy tokens identical across klotski, flexgen, layerwise" in out
    table = out[out.index("policy  tokens/s"):]
    assert all(p in table for p in ("klotski", "flexgen", "layerwise"))
    for policy in ("klotski", "flexgen", "layerwise"):
        assert json.loads((tmp_path / f"t-{policy}.json").read_text())


def test_demo_calibrates_a_fresh_profile_before_comparing(monkeypatch, capsys):
    """On a profile no run has calibrated, one short run goes first (its feedback calibrates the cache), so the
    compared policies plan on the same rates; a calibrated profile, or the interpreter's, skips it."""
    from dataclasses import replace
    from types import SimpleNamespace

    from klotski.hardware import preset

    import klotski.cli.options as options
    import klotski.profile_cache as profile_cache
    from klotski.cli.compare import calibrate_first

    runs = []

    class FakeLLM:
        def __init__(self, source):
            self.session = SimpleNamespace(hardware=replace(preset("t4"), source=source))
            self.closed = False

        def generate(self, prompts, params, prompt_token_ids=None):
            runs.append((tuple(prompts or prompt_token_ids), params.max_tokens))

        def close(self):
            self.closed = True

    args = SimpleNamespace()
    monkeypatch.setattr(profile_cache, "interpreter_on", lambda: False)
    for source, expected in (("measured", 1), ("measured+calibrated", 0)):
        built = []
        monkeypatch.setattr(options, "build_llm", lambda a, path, policy: built.append(FakeLLM(source)) or built[-1])
        runs.clear()
        calibrate_first(args, "/m", ("klotski", "flexgen"), ["a", "b"])
        assert len(runs) == expected and built[0].closed, source
        assert expected == 0 or runs[0] == (("a", "b"), 16)
        assert ("calibrates its hardware profile" in capsys.readouterr().out) == bool(expected)
    monkeypatch.setattr(profile_cache, "interpreter_on", lambda: True)
    runs.clear()
    calibrate_first(args, "/m", ("klotski", "flexgen"), ["a"])
    assert not runs
    monkeypatch.setattr(profile_cache, "interpreter_on", lambda: False)
    for policies in (("klotski",), ("resident", "resident")):  # nothing to compare, or nothing offloaded
        calibrate_first(args, "/m", policies, ["a"])
    assert not runs
    built.clear()
    monkeypatch.setattr(options, "build_llm", lambda a, path, policy: built.append(policy) or FakeLLM("measured"))
    calibrate_first(args, "/m", ("resident", "flexgen"), prompt_token_ids=[[1, 2]], max_tokens=8)
    assert built == ["flexgen"] and runs == [(([1, 2],), 8)]


def test_demo_single_resident_policy(demo_dir, capsys):
    assert main(["demo", "--size", "tiny", "--model-dir", demo_dir, "--max-tokens", "3", "--device", "cpu",
                 "--policy", "resident"]) == 0
    out = capsys.readouterr().out
    assert "policy resident:" in out and out.count("tokens: [") == 4


def test_demo_tokenizer_round_trips_bytes(demo_dir):
    tok = Tokenizer(demo_dir)
    ids = tok.encode("héllo, wörld")
    assert ids[0] == 256 and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == "héllo, wörld"


def test_generate_cli(demo_dir, capsys):
    rc = main(["generate", "--model", demo_dir, "--prompt", "abc", "--prompt", "de", "--max-tokens", "3",
               "--device", "cpu", "--temperature", "0.8", "--seed", "3"])
    assert rc == 0
    assert capsys.readouterr().out.count("tokens: [") == 2


def test_generate_cli_host_compute(demo_dir, tmp_path, capsys):
    """--host-compute reaches the offloaded runtime: attention and every cold expert forced on the CPU gives the
    resident engine's greedy tokens; a setting it cannot read is a clear error, exit code 2."""
    args = ["generate", "--model", demo_dir, "--prompt", "abc", "--prompt", "de", "--max-tokens", "3",
            "--device", "cpu"]
    assert main(args) == 0
    resident = [line for line in capsys.readouterr().out.splitlines() if "tokens: [" in line]
    offload = ["--policy", "flexgen", "--gpu-memory", "16MiB", "--cpu-memory", "64MiB", "--offload-dir",
               str(tmp_path / "off")]
    assert main(args + offload + ["--host-compute", "prefill=cpu,decode=cpu,experts=all"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "tokens: [" in line] == resident
    assert main(args + offload + ["--host-compute", "decode=npu"]) == 2
    assert "decode_attn must be one of" in capsys.readouterr().err


def test_generate_cli_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_demo_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    import klotski.demo as demo

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_byte_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_checkpoint(str(tmp_path / "m"), size="tiny")
    assert os.listdir(tmp_path) == []  # nothing that looks like a checkpoint is left behind
    cfg = demo.demo_config("tiny")
    assert json.loads(json.dumps(cfg))["model_type"] == "mixtral"


def test_bench_writes_json_per_policy(demo_dir, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--model", demo_dir, "--num-prompts", "3", "--prompt-len", "6", "--gen-len", "3",
               "--device", "cpu", "--policy", "klotski,layerwise", "--gpu-memory", "4MiB", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert set(result["results"]) == {"klotski", "layerwise"} and result["tokens_agree"]
    assert result["results"]["klotski"]["generated_tokens"] == 9
    assert result["results"]["klotski"]["tokens_per_s"] > 0


def test_bench_calibrate_saves_the_fitted_profile(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from klotski.hardware import load_profile
    from klotski.runtime.planning import profile_path

    rc = main(["bench", "--model", demo_dir, "--num-prompts", "2", "--prompt-len", "6", "--gen-len", "3",
               "--device", "cpu", "--policy", "klotski", "--gpu-memory", "4MiB", "--calibrate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "calibrated on the klotski run" in out
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (a run under the interpreter is never cached)
    rc = main(["bench", "--model", demo_dir, "--num-prompts", "2", "--prompt-len", "6", "--gen-len", "3",
               "--device", "cpu", "--policy", "klotski", "--gpu-memory", "4MiB", "--calibrate"])
    assert rc == 0 and "saved " + str(profile_path("cpu")) in capsys.readouterr().out
    saved = load_profile(profile_path("cpu"))  # one cache: the calibrated profile replaces the measured one
    assert saved.source.endswith("+calibrated") and saved.source.count("calibrated") == 1
