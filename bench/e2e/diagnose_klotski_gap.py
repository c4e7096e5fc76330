"""Why does the klotski policy run faster than its calibrated planner prediction? Measured vs simulated streams.

    python bench/e2e/diagnose_klotski_gap.py --layers 8 --gpu-memory 64MiB --cpu-memory 24MiB

Builds the same random Mixtral-shaped checkpoint as bench_offload.py (temp dir), runs the klotski policy with
the bench's budgets and workload, and reads the executor's trace: per decode step, busy seconds per stream,
bytes read from disk (experts vs dense weights, experts the batch used vs prefetched-and-unused), how many disk
reads were in flight at once, and the effective disk bandwidth per lane and in aggregate. Then it simulates one
decode step of the executor's own plan (``klotski.simulate.simulate_model_step``, same shape as
``klotski.runtime.planning.predict``) on the profile as loaded and on that profile calibrated on this run
(not saved), and prints the same figures side by side. Writes JSON (and optionally the Chrome trace).
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import shutil
import os
import tempfile
import time
from dataclasses import replace

import torch


def _bench_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_offload.py")
    spec = importlib.util.spec_from_file_location("bench_offload", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _in_flight(intervals: list[tuple[float, float]]) -> dict:
    """Max concurrency and seconds spent with k intervals open (k >= 1)."""
    ev = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    open_, last, at = 0, None, {}
    peak = 0
    for t, d in ev:
        if last is not None and open_ > 0:
            at[open_] = at.get(open_, 0.0) + (t - last)
        open_ += d
        peak = max(peak, open_)
        last = t
    return {"max": peak, "seconds_at": at}


def measured(ex, phase: str) -> dict:
    """Per-step figures of the traced forwards of ``phase``: window 0 is the prompt (one chunk, checked by the
    caller), the rest are decode steps."""
    spans = list(ex.tracer.spans)
    windows = list(ex.tracer._windows)
    decode = windows[:1] if phase == "prefill" else windows[1:]
    steps = len(decode)

    def in_decode(s):
        return any(a <= s < b for a, b in decode)

    dspans = [sp for sp in spans if in_decode(sp[2])]
    busy: dict[str, float] = {}
    for stream, _, s, e, _ in dspans:
        busy[stream] = busy.get(stream, 0.0) + (e - s)
    disk = [sp for sp in dspans if sp[4].get("tier") in ("disk", "store")]
    h2d = [sp for sp in dspans if "bytes" in sp[4] and sp[4].get("tier") == "cpu"]
    disk_expert = sum(sp[4]["bytes"] for sp in disk if " e" in sp[1])
    disk_dense = sum(sp[4]["bytes"] for sp in disk if " e" not in sp[1])
    per_lane = {}
    for stream, _, s, e, a in disk:
        d = per_lane.setdefault(stream, {"reads": 0, "bytes": 0, "seconds": 0.0})
        d["reads"] += 1
        d["bytes"] += a["bytes"]
        d["seconds"] += e - s
    fl = _in_flight([(s, e) for _, _, s, e, _ in disk])
    union = sum(fl["seconds_at"].values())
    wall = sum(b - a for a, b in decode)
    nbytes = disk_expert + disk_dense
    return {
        "decode_steps": steps, "step_s": wall / steps,
        "busy_per_step": {k: v / steps for k, v in busy.items()},
        "disk_bytes_per_step": nbytes / steps, "disk_expert_bytes_per_step": disk_expert / steps,
        "disk_dense_bytes_per_step": disk_dense / steps,
        "disk_reads_per_step": len(disk) / steps,
        "h2d_bytes_per_step": sum(sp[4]["bytes"] for sp in h2d) / steps,
        "disk_per_lane": {k: {**v, "GBps": v["bytes"] / v["seconds"] / 1e9 if v["seconds"] else 0.0}
                          for k, v in per_lane.items()},
        "disk_in_flight_max": fl["max"],
        "disk_in_flight_seconds_per_step": {k: v / steps for k, v in sorted(fl["seconds_at"].items())},
        "disk_union_s_per_step": union / steps,
        "disk_aggregate_GBps": nbytes / union / 1e9 if union else 0.0,
        "disk_serial_GBps": nbytes / sum(v["seconds"] for v in per_lane.values()) / 1e9 if per_lane else 0.0,
    }


def compute_fit(ex) -> tuple[float, float]:
    """Least-squares fit of every traced compute span: seconds = calls * overhead + FLOPs / rate.
    -> (overhead seconds per call, FLOP/s)."""
    import numpy as np

    rows = [(a.get("calls", 1), a.get("flops", 0.0) + a.get("score_flops", 0.0), e - s)
            for st, _, s, e, a in ex.tracer.spans if st == "compute" and "op" in a]
    A = np.array([[c, f] for c, f, _ in rows], dtype=float)
    y = np.array([t for _, _, t in rows])
    (over, inv_rate), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(over), float(1.0 / inv_rate)


def with_compute_fit(hw, dtype: str, overhead: float, rate: float):
    """``hw`` with the device's per-call overhead and matmul / attention rates set to the fit."""
    mm = dict(hw.matmul_flops)
    mm[dtype] = rate
    return replace(hw, op_overhead_s=overhead, matmul_flops=mm, attention_flops=rate)


def simulated(ex, hw, prompt_len: int, gen_len: int, sequences: int, phase: str) -> dict:
    from klotski.schedule import StepShape, build_schedule
    from klotski.simulate import simulate_model_step

    plan = ex.plan
    n = plan.n
    b = max(1, -(-sequences // n))
    if phase == "prefill":
        shape = StepShape("prefill", b, n, prompt_len, 0, prompt_len + gen_len)
    else:
        shape = StepShape("decode", b, n, 1, prompt_len + gen_len // 2, prompt_len + gen_len)
    policy = "klotski" if plan.num_hot is not None else "flexgen"
    res = simulate_model_step(policy, ex.costs, plan.placement, shape, hw, num_hot=plan.num_hot,
                              overlap=plan.overlap)
    full = build_schedule(policy, ex.costs, plan.placement, shape, None, num_hot=plan.num_hot, overlap=plan.overlap)
    reads = [op for op in full.ops if op.link == "disk"]
    return {"step_s": res.makespan, "busy_per_step": dict(res.busy),
            "disk_bytes_per_step": res.bytes_moved.get("disk", 0), "h2d_bytes_per_step": res.bytes_moved.get("h2d", 0),
            "disk_reads_per_step": len(reads), "disk_in_flight_max": 1,
            "disk_GBps": hw.disk_bandwidth / 1e9, "h2d_GBps": hw.h2d_bandwidth / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-memory", default="64MiB")
    ap.add_argument("--cpu-memory", default="24MiB")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--trace", default="", help="write the measured Chrome trace here")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = ap.parse_args()

    from klotski import LLM, SamplingParams
    from klotski.runtime.planning import calibrate_from_run, machine_profile, predict
    from klotski.units import format_bytes

    work = tempfile.mkdtemp(prefix="klotski-diag-")
    atexit.register(shutil.rmtree, work, True)
    model = os.path.join(work, "model")
    _bench_module().build_checkpoint(model, args)
    llm = LLM(model, device="cpu", policy="klotski", gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
              offload_dir=os.path.join(work, "store"), num_batches="auto", batch_size="auto")
    ex = llm.executor
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (ex.group_size, args.prompt_len), generator=g).tolist()
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=sp)  # warm-up, as in the bench
    llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    m = llm.metrics
    if m.extra.get("prefill_chunks", 1) != 1:
        raise RuntimeError(f"prefill ran in {m.extra['prefill_chunks']} chunks; window split assumes 1")
    if args.trace:
        ex.write_trace(args.trace)
    hw0 = machine_profile("cpu", calibrated=False)
    hw_cal = calibrate_from_run(ex, hw0, save=False)
    seqs = ex.group_size
    over, rate = compute_fit(ex)
    hw_fit = with_compute_fit(hw_cal, str(ex.dtype).replace("torch.", ""), over, rate)
    pred = {"profile": predict(ex.plan, ex.costs, hw0, args.prompt_len, args.gen_len, seqs),
            "calibrated": predict(ex.plan, ex.costs, hw_cal, args.prompt_len, args.gen_len, seqs),
            "calibrated_compute_fit": predict(ex.plan, ex.costs, hw_fit, args.prompt_len, args.gen_len, seqs)}
    print(f"plan {m.extra['plan']}  b x n = {ex.batch_size} x {ex.num_batches}")
    print(f"layout: {m.extra['placement']}")
    print(f"tokens/s: measured {m.tokens_per_s:.1f}, predicted on profile {pred['profile']:.1f}, "
          f"on profile calibrated on this run {pred['calibrated']:.1f}, calibrated + 2-parameter compute fit "
          f"({over * 1e6:.0f} us/call + {rate / 1e9:.1f} GFLOP/s) {pred['calibrated_compute_fit']:.1f}; measured prefill {m.extra['prefill_s']:.3f} s, "
          f"decode {m.extra['decode_s']:.3f} s ({args.gen_len - 1} steps)")
    report = {}
    for phase in ("prefill", "decode"):
        meas = measured(ex, phase)
        sims = {"sim (profile)": simulated(ex, hw0, args.prompt_len, args.gen_len, seqs, phase),
                "sim (calibrated)": simulated(ex, hw_cal, args.prompt_len, args.gen_len, seqs, phase)}
        # what-if: the calibrated disk rate scaled by the measured gain of two reads in flight
        gain = meas["disk_aggregate_GBps"] / max(meas["disk_serial_GBps"], 1e-12)
        two = replace(hw_cal, disk_bandwidth=hw_cal.disk_bandwidth * gain)
        sims[f"sim (cal., disk x{gain:.2f})"] = simulated(ex, two, args.prompt_len, args.gen_len, seqs, phase)
        sims["sim (cal. + compute fit)"] = simulated(ex, hw_fit, args.prompt_len, args.gen_len, seqs, phase)
        report[phase] = {"measured": meas, "simulated": sims}
        streams = sorted(set(meas["busy_per_step"]) | {s for v in sims.values() for s in v["busy_per_step"]})
        cols = ["measured"] + list(sims)
        rows = [("step (ms)", [meas["step_s"] * 1e3] + [v["step_s"] * 1e3 for v in sims.values()], "{:.1f}")]
        for st in streams:
            rows.append((f"busy {st} (ms)", [meas["busy_per_step"].get(st, 0) * 1e3]
                         + [v["busy_per_step"].get(st, 0) * 1e3 for v in sims.values()], "{:.1f}"))
        rows += [("disk bytes/step (MiB)", [meas["disk_bytes_per_step"] / 2**20]
                  + [v["disk_bytes_per_step"] / 2**20 for v in sims.values()], "{:.1f}"),
                 ("h2d bytes/step (MiB)", [meas["h2d_bytes_per_step"] / 2**20]
                  + [v["h2d_bytes_per_step"] / 2**20 for v in sims.values()], "{:.1f}"),
                 ("disk reads/step", [meas["disk_reads_per_step"]] + [v["disk_reads_per_step"] for v in sims.values()], "{:.1f}"),
                 ("disk reads in flight (max)", [meas["disk_in_flight_max"]] + [1 for _ in sims], "{}")]
        print(f"\n{phase + ' (per step)':<28}" + "".join(f"{c:>26}" for c in cols))
        for name, vals, fmt in rows:
            print(f"{name:<28}" + "".join(f"{fmt.format(v):>26}" for v in vals))
        print(f"measured disk: experts {format_bytes(int(meas['disk_expert_bytes_per_step']))}/step, dense "
              f"{format_bytes(int(meas['disk_dense_bytes_per_step']))}/step; per lane "
              + ", ".join(f"{k}: {v['reads']} reads {v['GBps']:.2f} GB/s" for k, v in meas["disk_per_lane"].items()))
        print(f"measured disk seconds/step with k reads in flight: "
              f"{ {k: round(v, 4) for k, v in meas['disk_in_flight_seconds_per_step'].items()} }; aggregate "
              f"{meas['disk_aggregate_GBps']:.2f} GB/s vs serial-sum {meas['disk_serial_GBps']:.2f} GB/s")
    print(f"\nprofile disk {hw0.disk_bandwidth / 1e9:.2f} GB/s h2d {hw0.h2d_bandwidth / 1e9:.2f} GB/s; calibrated disk "
          f"{hw_cal.disk_bandwidth / 1e9:.2f} GB/s h2d {hw_cal.h2d_bandwidth / 1e9:.2f} GB/s")
    print(f"prefetch stats: { {k: round(v, 3) for k, v in m.extra.items() if k.startswith('prefetch')} }")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"diagnose-klotski-gap-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "tokens_per_s": m.tokens_per_s, "plan": m.extra["plan"],
                   "layout": m.extra["placement"], "predicted_tokens_per_s": pred,
                   "compute_fit": {"overhead_s_per_call": over, "flops_per_s": rate}, "phases": report,
                   "profile": {k: v for k, v in hw0.to_dict().items() if k != "notes"},
                   "calibrated": {k: v for k, v in hw_cal.to_dict().items() if k != "notes"}}, f, indent=1, default=str)
    print(f"wrote {path}")
    llm.close()


if __name__ == "__main__":
    main()
