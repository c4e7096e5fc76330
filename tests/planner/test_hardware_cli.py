import json
import time

import pytest

from klotski.hardware import PRESETS, HardwareProfile, get_hardware, load_profile, measure_profile, preset


def test_presets_are_labelled_and_complete():
    for name in ("rtx3090-pcie4", "h800-pcie5", "t4", "l4", "a100-80gb", "h100-80gb"):
        hw = PRESETS[name]
        assert hw.source == "preset" and hw.device == "cuda"
        assert hw.h2d_bandwidth > 0 and hw.disk_bandwidth > 0 and hw.attention_flops > 0
        assert hw.matmul_rate("bfloat16") > 0 and hw.matmul_rate("float8_e4m3") > 0
    assert preset("rtx3090").gpu_memory == 24 << 30
    assert preset("T4").matmul_rate("float16") > preset("T4").matmul_rate("bfloat16")  # no bf16 tensor cores
    with pytest.raises(KeyError, match="presets"):
        preset("tpu-v9")


def test_profile_json_roundtrip_and_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    hw = preset("l4").with_memory(gpu_memory="20GiB", cpu_memory="64GiB")
    path = hw.save()
    assert path == tmp_path / "klotski" / "hardware-cuda.json"  # the cache the runtime reads for the GPU
    assert load_profile() == hw
    assert get_hardware(str(path)) == hw
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**hw.to_dict(), "warp_drive": 1}))
    with pytest.raises(ValueError, match="warp_drive"):
        load_profile(bad)
    with pytest.raises(FileNotFoundError, match="klotski profile"):
        load_profile(tmp_path / "none.json")


def test_measure_cpu_profile_is_quick(tmp_path):
    """Quick in the work it does: CPU seconds (all threads), which other jobs on a shared machine do not
    inflate the way they stretch wall time; the wall-clock bound only catches a hang."""
    t0, c0 = time.perf_counter(), time.process_time()
    hw = measure_profile(device="cpu", disk_dir=str(tmp_path))
    assert time.process_time() - c0 < 10.0
    assert time.perf_counter() - t0 < 120.0
    assert hw.source == "measured" and hw.device == "cpu"
    assert hw.matmul_rate("float32") > 1e8 and hw.h2d_bandwidth > 1e8 and hw.disk_bandwidth > 1e6
    assert 0 < hw.gpu_memory <= hw.cpu_memory
    assert HardwareProfile.from_dict(hw.to_dict()) == hw


def test_cli_plan_prints_plan_and_table(capsys, tmp_path):
    from klotski.cli.plan import main

    trace = tmp_path / "t.json"
    rc = main(["--preset", "mixtral-8x7b", "--hardware", "rtx3090-pcie4", "--gpu-memory", "24GiB",
               "--cpu-memory", "256GiB", "--prompt-len", "512", "--gen-len", "32", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "plan (klotski)" in out and "tokens/s" in out
    for policy in ("layerwise", "flexgen", "klotski", "resident"):
        assert policy in out
    assert json.loads(trace.read_text())["traceEvents"]


def test_cli_plan_with_expert_selection(capsys, tmp_path):
    """Decode steps planned with the fewer experts selection leaves (and the narrower prefetch widths searched):
    never predicted slower than exact routing; the workload line says what was planned for."""
    from klotski.cli.plan import main

    args = ["--preset", "mixtral-8x7b", "--hardware", "rtx3090-pcie4", "--gpu-memory", "24GiB", "--cpu-memory",
            "256GiB", "--prompt-len", "512", "--gen-len", "32", "--policy", "klotski", "--host", "off"]
    rates = {}
    for sel in ("off", "lynx-offload:0.8"):
        assert main(args + ["--expert-selection", sel, "--json", str(tmp_path / f"{sel}.json")]) == 0
        plans = json.loads((tmp_path / f"{sel}.json").read_text())
        rates[sel] = plans["klotski"]["tokens_per_s"]
    out = capsys.readouterr().out
    assert out.count("expert selection lynx-offload:0.8 on decode steps") == 1
    assert rates["lynx-offload:0.8"] >= rates["off"]
    assert main(args + ["--expert-selection", "lynx:1.5"]) == 2
    assert "aggressiveness must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_plan_impossible_limits(capsys):
    from klotski.cli.plan import main

    rc = main(["--preset", "olmoe-1b-7b", "--hardware", "t4", "--gpu-memory", "64MiB", "--cpu-memory", "1GiB"])
    assert rc == 2
    assert "needs GPU >=" in capsys.readouterr().err


def test_profile_measured_on_a_busy_machine_says_so(monkeypatch):
    import klotski.hardware as hardware

    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with pytest.warns(UserWarning, match="busy"):
        note = hardware._busy_note()
    assert "load average 64.0" in note
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert hardware._busy_note() == ""


def test_memory_bandwidths_are_measured_reading_written_memory(tmp_path, monkeypatch):
    """The copies that time memory bandwidth (CPU memory; CPU mode's converting "H2D" copy) read a source that
    was written first: an untouched one maps every page to the kernel's one zero page, read from cache, and
    measured 1.4-4x the machine's bandwidth."""
    import torch

    import klotski.hardware as hardware

    sources = []

    def fake_best_time(fn, sync, reps, budget_s):  # records the source tensor a timed copy reads
        captured = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        sources.extend(t for name, t in captured.items() if name in ("src", "half") and isinstance(t, torch.Tensor))
        return 1.0

    monkeypatch.setattr(hardware, "_best_time", fake_best_time)
    monkeypatch.setattr(hardware, "_measure_call_overhead", lambda *a: 1e-5)
    hardware.measure_profile(device="cpu", disk_dir=str(tmp_path))
    assert len(sources) == 2
    assert all(bool((s != 0).all()) for s in sources)
