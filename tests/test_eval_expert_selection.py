"""bench/quality/eval_expert_selection.py: its byte accounting never counts a GPU-resident expert as loaded,
and its top-1 floor is what the runtime's routing gives; bench/quality/selection_targets.py judges the targets
from its JSON."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "quality"))

from eval_expert_selection import Top1Floor, expert_loads, run_row  # noqa: E402

from klotski import LLM  # noqa: E402
from klotski.hardware import get_hardware  # noqa: E402
from klotski.model.expert_selection import ExpertSelection  # noqa: E402

ASSET = os.path.join(os.path.dirname(__file__), "..", "klotski", "assets", "tiny_moe")


def test_expert_loads_flags_a_resident_expert_counted_as_loaded():
    home = {(0, 0): ("gpu", 0), (0, 1): ("cpu", None)}
    spans = [("expert_io", "L0 e1", 0, 1, {"bytes": 10}), ("prefetch", "L0 e0", 0, 1, {"bytes": 7}),
             ("compute", "L0 gate b0", 0, 1, {})]
    ex = SimpleNamespace(tracer=SimpleNamespace(spans=spans), w=SimpleNamespace(expert_home=home))
    assert expert_loads(ex, 0) == (17, 1, 2, 1)
    assert expert_loads(ex, 1) == (7, 1, 1, 1)


def test_resident_experts_are_not_counted_and_the_top1_floor_bounds_the_selection(monkeypatch):
    import klotski.triton_kernels as kernels

    monkeypatch.setattr(kernels, "fused_moe", kernels.fused_moe_torch)  # byte accounting, not the kernel, is tested
    llm = LLM(ASSET, device="cpu", policy="klotski", gpu_memory="48MiB", cpu_memory="64MiB", num_batches=1,
              batch_size=16, hardware=get_hardware("rtx3090"))
    try:
        ex = llm.executor
        spec = llm.spec
        tiers = [ex.w.expert_home[(lay, e)][0] for (lay, e) in ex.w.expert_home]
        assert "gpu" in tiers and any(t != "gpu" for t in tiers)  # some experts resident, some streamed
        seqs = torch.randint(2, spec.vocab_size, (16, 1 + 8 + 4 + 1), generator=torch.Generator().manual_seed(0))
        floor = Top1Floor(ex)
        ex.compute.selection = ExpertSelection.parse("lynx:1.0")
        r = run_row(ex, seqs, 8, 4, 2, floor)
        assert r["resident_loads"] == 0
        assert r["expert_loads_per_step"] > 0
        assert r["expert_bytes_per_step"] == r["expert_loads_per_step"] * r["bytes_per_load"]
        # at aggressiveness 1 plain Lynx keeps exactly the top-1 union (top_k = 2 < its size here)
        assert 1 <= r["top1_distinct"] <= r["distinct"] + 1e-9
        assert r["top1_nonresident"] <= r["chosen_nonresident"] + 1e-9
        ex.compute.selection = ExpertSelection.parse("lynx:0")
        exact = run_row(ex, seqs, 8, 4, 2, floor)
        assert exact["top1_distinct"] == r["top1_distinct"]  # the floor is the router's, whatever selection does
        assert exact["distinct"] >= r["distinct"]
    finally:
        llm.close()


def _row(setting, ppl_change, kib):
    mode = "exact" if setting == "exact" else setting.split(":")[0]
    a = 0.0 if setting == "exact" else float(setting.split(":")[1])
    return {"setting": setting, "mode": mode, "aggressiveness": a, "ppl": 100 * (1 + ppl_change),
            "ppl_change": ppl_change, "argmax_agree": 1.0, "greedy_agree": 1.0,
            "distinct": 1.0, "top1_distinct": 1.0, "top1_nonresident": 1.0, "chosen_nonresident": 1.0,
            "expert_loads_per_step": kib / 100, "prefetch_loads_per_step": 0.0, "expert_bytes_per_step": kib * 1024.0,
            "bytes_vs_exact": kib / 1000 - 1}


def test_selection_targets_judges_both_targets_from_the_eval_json(tmp_path):
    from selection_targets import main as targets_main

    ev = _eval_json(0.004)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(ev))
    assert targets_main(["--eval", f"streamed={path}", "--out", str(tmp_path), "--tag", "t"]) == 0
    out = json.loads((tmp_path / "t.json").read_text())["eval"]["streamed"]
    assert out["target_25pct"] == {"lynx": False, "lynx-offload": True}  # -20 % and -40 %
    assert abs(out["offload_vs_plain_cheapest"] - (600 / 800 - 1)) < 1e-12
    # plain Lynx at offload-aware's +0.5 %: between lynx:0.5 (+0.4 %, 800 KiB) and lynx:1.0 (+2 %, 500 KiB)
    interp = out["offload_vs_plain_interpolated"]
    assert abs(interp["plain_bytes_per_step"] - (800 - 300 / 16) * 1024) < 1e-6
    assert abs(interp["offload_vs_plain"] - (600 / (800 - 300 / 16) - 1)) < 1e-12
    md = (tmp_path / "t.md").read_text()
    assert "-25.0 % bytes (target -10 %: met)" in md and "`python eval`" in md
    with pytest.raises(SystemExit):
        targets_main(["--eval", str(path), "--out", str(tmp_path), "--tag", "t"])  # no NAME=


def _eval_json(plain_half_ppl):
    rows = [_row("exact", 0.0, 1000), _row("lynx:0.5", plain_half_ppl, 800), _row("lynx:1.0", 0.02, 500),
            _row("lynx-offload:1.0", 0.005, 600)]
    return {"command": "python eval", "placement": "p", "rows": rows, "resident_loads_counted": 0,
          "args": {"num_batches": 1, "batch_size": 16, "decode_steps": 96},
          "top1_floor_bytes_per_step": 400 * 1024.0, "top1_floor_vs_exact": -0.6,
          "cheapest_within_1pct": {"lynx": "lynx:0.5", "lynx-offload": "lynx-offload:1.0"},
          "offload_vs_plain_matched": [{"offload": "lynx-offload:1.0", "plain": "lynx:0.5", "offload_ppl": 0.005,
                                        "plain_ppl": plain_half_ppl, "offload_vs_plain": 600 / 800 - 1}]}


def test_windows_shift_draws_a_disjoint_sample_and_zero_is_unchanged():
    from eval_expert_selection import windows

    stream = torch.arange(2, 1002)
    base = windows(stream, 4, 11, 0)
    assert base[:, 0].eq(0).all() and base[:, 1].tolist() == [2, 249, 496, 743]  # stride (1000 - 10) // 4
    other = windows(stream, 4, 11, 0, shift=0.5)
    assert other[:, 1].tolist() == [125, 372, 619, 866]
    assert not set(base[:, 1:].flatten().tolist()) & set(other[:, 1:].flatten().tolist())
    with pytest.raises(ValueError, match="shift"):
        windows(stream, 4, 11, 0, shift=1.0)



def test_selection_targets_pools_window_samples(tmp_path):
    """Two window samples of one placement: perplexities pooled before the settings are judged (plain Lynx at
    0.5 is +0.4 % on one sample and +3 % on the other: pooled it is out of the 1 % budget)."""
    from selection_targets import main as targets_main

    paths = []
    for i, ppl in enumerate((0.004, 0.03)):
        paths.append(tmp_path / f"eval{i}.json")
        paths[-1].write_text(json.dumps(_eval_json(ppl)))
    assert targets_main(["--eval", f"streamed={paths[0]}+{paths[1]}", "--out", str(tmp_path), "--tag", "p"]) == 0
    out = json.loads((tmp_path / "p.json").read_text())["eval"]["streamed"]
    assert "lynx" not in out["target_25pct"] and out["target_25pct"]["lynx-offload"]
    assert abs(out["rows"]["lynx-offload:1.0"]["ppl_change"] - 0.005) < 1e-12
    assert out["offload_vs_plain_matched"] is None  # no plain row within 1 % and no worse than +0.5 %
    assert out["commands"] == ["python eval", "python eval"]
    other = _eval_json(0.004)
    other["placement"] = "q"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="cannot pool"):
        targets_main(["--eval", f"streamed={paths[0]}+{tmp_path / 'other.json'}", "--out", str(tmp_path), "--tag", "x"])


def test_plain_bytes_interpolate_on_each_prefetch_width_and_take_the_cheapest():
    from selection_targets import plain_bytes_at

    rows = []
    for w, scale in ((4, 1.0), (0, 0.8)):  # width 0 loads 20 % fewer bytes at every setting
        for r in (_row("exact", 0.0, 1000 * scale), _row("lynx:0.5", 0.004, 800 * scale),
                  _row("lynx:1.0", 0.02, 500 * scale)):
            rows.append({**r, "prefetch_width": w})
    got = plain_bytes_at(rows, 0.005)
    assert abs(got - 0.8 * (800 - 300 / 16) * 1024) < 1e-6


def test_eval_sweeps_prefetch_widths(tmp_path, monkeypatch):
    """--prefetch-widths: every setting also runs at the widths asked for (labels ``@w<width>``, the plan's
    width first and its exact row the reference); narrower widths prefetch fewer experts; 'vs exact' is
    against the cheapest exact row. The experts run on the torch reference kernel (under the suite's
    TRITON_INTERPRET the Triton interpreter would take most of the time; the kernels are tested elsewhere)."""
    import klotski.triton_kernels as kernels
    from eval_expert_selection import main

    monkeypatch.setattr(kernels, "fused_moe", kernels.fused_moe_torch)

    argv = ["--model", ASSET, "--hardware", "rtx3090", "--gpu-memory", "16MiB", "--cpu-memory", "64MiB",
            "--num-batches", "1", "--batch-size", "4", "--prompt-len", "8", "--decode-steps", "3",
            "--greedy-tokens", "1", "--modes", "lynx-offload", "--grid", "1.0", "--prefetch-widths", "0",
            "--threads", "1", "--out", str(tmp_path), "--tag", "w"]
    assert main(argv) == 0
    d = json.loads((tmp_path / "w.json").read_text())
    plan_width = d["prefetch_widths"][0]
    assert plan_width > 0 and d["prefetch_widths"] == [plan_width, 0]
    rows = {r["setting"]: r for r in d["rows"]}
    assert set(rows) == {"exact", "lynx-offload:1.0@w" + str(plan_width), "exact@w0", "lynx-offload:1.0@w0"}
    assert rows["exact"]["prefetch_width"] == plan_width and rows["exact@w0"]["ppl_change"] == pytest.approx(0, abs=1e-5)
    assert rows["exact@w0"]["prefetch_loads_per_step"] == 0 < rows["exact"]["prefetch_loads_per_step"]
    base = min(rows["exact"]["expert_bytes_per_step"], rows["exact@w0"]["expert_bytes_per_step"])
    for r in rows.values():
        assert r["bytes_vs_exact"] == pytest.approx(r["expert_bytes_per_step"] / base - 1)
    assert "`@w<width>`" in (tmp_path / "w.md").read_text()


def test_prefetch_widths_option_is_checked():
    from eval_expert_selection import parse_args

    assert parse_args([]).prefetch_widths == [] and parse_args(["--prefetch-widths", "0,2"]).prefetch_widths == [0, 2]
    for bad in ("x", "-1", "1,,2"):
        with pytest.raises(SystemExit):
            parse_args(["--prefetch-widths", bad])
