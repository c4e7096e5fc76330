"""CPU mode, host compute forced on: per-op measured seconds (the run's trace) next to the cost model's
prediction of the very op the builder emitted, per op kind; and whether any KV-load span remains.

    python bench/e2e/host_compute_ops.py --model DIR [--policy klotski --prompt-len 256 --gen-len 8 --seqs 8
        --repeats 2 --hardware FILE]

(make a model with ``python bench/e2e/make_checkpoint.py mixtral-8x7b DIR --layers 4 --dtype float32 --override
hidden_size=512 --override intermediate_size=1536 --override num_attention_heads=8 --override
num_key_value_heads=2 --override head_dim=64 --override vocab_size=1024``).

Paired: the rows of a round run on one profile. The base is this machine measured in this process (its torch
thread count; ``--hardware FILE`` instead: that profile for every round, not refitted); each round first fits it
to a device-only run of the workload (``OffloadedSession.calibrate``, not cached: the bench never writes this
machine's profile) and gives the result explicitly to both rows (an explicit profile is never refitted, so
the rows cannot drift apart). Rows: attention and cold experts on the CPU (``HostCompute("cpu", "cpu",
"all")``) and everything on the device, both with the KV cache in host memory; rounds rotate the rows' order,
and the medians pool all rounds.

Every compute span carries the cost of the builder's ops it ran (``cost``, :func:`klotski.runtime.trace.op_cost`);
its predicted seconds are ``op_seconds`` of them (compute ops only: in CPU mode the act_d2h / act_h2d copies of
the host lanes hand the same tensor over). ``--threads`` (default 1) sets torch's intra-op threads of every
lane: with 2 per lane on 2 cores, concurrent lanes oversubscribe the cores and OpenMP barriers stall (an
index_add_ of one row went from 0.04 to 17-38 ms here). In CPU mode all lanes share the machine's cores and
memory: calibration fits how much another lane beside an op slows its fixed costs (the profile's
``contention``), and each op is predicted with the share of its span another lane ran beside it
(``klotski.runtime.trace.contended_shares``, the ``overlap`` column); the table also gives the median over ops
that ran alone (less than 10% of their span beside another lane). The last columns add to a
compute-stream op the idle time before it that no other lane explains (``gap ms``: the interpreter issuing
it, :func:`klotski.runtime.trace.dispatch_gaps`): calibration observes an op as that gap plus its span and
fits the per-call overhead and each op kind's own costs to it (``klotski.calibration.fit_kind_costs``, printed
per round), so the prediction holds the gap too (the span alone is below it for ops shorter than their
overhead). Prints a table and writes JSON under bench/results/. Do not run under TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from klotski import LLM, SamplingParams
from klotski.calibration import calibrate
from klotski.costs import op_seconds
from klotski.program.host import HostCompute
from klotski.runtime import OffloadedSession
from klotski.runtime.trace import contended_shares, cost_op, dispatch_gaps

COMPUTE_LANES = ("compute", "cpu_attn", "cpu_experts")
ALONE = 0.10  # an op ran alone when other lanes' compute overlapped less than this share of its span


def session(llm, args, host, hw):
    llm.session.close()
    llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, args.policy, args.gpu_memory,
                                   None, None, num_batches=2, batch_size=args.seqs // 2, kv="cpu",
                                   host_compute=host, hardware=hw)
    return llm.session


def calibrated_profile(args, base):
    """``base`` fitted to a device-only run of the workload (``OffloadedSession.calibrate``, not cached: the
    bench leaves this machine's profile alone) -> (profile, the same fit blind to contention: every op's
    contended share taken as 0, as calibration was before it fitted one; the fitted run's typical and total
    measured / predicted: the fit matches the total, so a typical op of a run with preempted ops measures
    faster)."""
    prompts, sp = workload(args)
    with LLM(args.model, device="cpu", dtype="float32") as llm:
        s = session(llm, args, HostCompute(), base)
        llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        s.reset_metrics()
        llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        hw = s.calibrate(base=base, save=False)
        blind = calibrate(base, [(replace(op, contended=0.0), sec) for op, sec in s.executor.tracer.observations()],
                          dtype="float32")
        ops = paired(s.executor.tracer, hw, "float32", 1)
    typical = statistics.median(op[1] / op[3] for op in ops)
    total = sum(op[1] for op in ops) / sum(op[3] for op in ops)
    return hw, blind, {"median_measured_over_predicted": typical, "total_measured_over_predicted": total}


def workload(args):
    prompts = [[(7 * i + j) % 500 + 3 for j in range(args.prompt_len)] for i in range(args.seqs)]
    return prompts, SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)


def paired(tracer, hw, dtype: str, prefill_steps: int, blind=None):
    """(kind@lane phase, measured s, dispatch gap s, predicted s, overlap share, cost, predicted s on
    ``blind``, the profile fitted without contention, or None) per compute span of
    ``tracer``: its predicted seconds are ``op_seconds`` of the builder's ops it ran (the span's ``cost`` arg);
    the gap is the idle time before it on the compute stream that no other lane explains
    (:func:`klotski.runtime.trace.dispatch_gaps`, 0 on the host lanes), which calibration counts as part of
    the op (the fitted per-call overhead holds it). One batch group: its first ``prefill_steps`` forwards are
    the prefill."""
    spans = list(tracer.spans)
    gaps = dispatch_gaps(spans, tracer.windows)
    shares = contended_shares(spans)
    out = []
    for i, span in enumerate(spans):
        stream, _, s, e, a = span
        if stream not in COMPUTE_LANES or "cost" not in a:
            continue
        op = cost_op(a["cost"], stream, shares.get(i, 0.0))
        phase = "prefill" if a["step"] < prefill_steps else "decode"
        out.append((f"{a['cost']['kind']}@{stream} {phase}", e - s, gaps.get(i, 0.0), op_seconds(op, hw, dtype),
                    op.contended, a["cost"], op_seconds(op, blind, dtype) if blind is not None else None))
    return out


def run(args, host, hw, blind=None) -> dict:
    prompts, sp = workload(args)
    with LLM(args.model, device="cpu", dtype="float32") as llm:
        s = session(llm, args, host, hw)
        llm.generate(prompt_token_ids=prompts, sampling_params=sp)  # warm-up (explicit profile: no feed-back)
        s.reset_metrics()
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        wall = time.perf_counter() - t0
        tracer, spans = s.executor.tracer, list(s.executor.tracer.spans)
        prefill_steps, group = max(1, s.executor.time["prefill_chunks"]), s.executor.group_size
    if args.seqs > group:
        raise SystemExit(f"--seqs {args.seqs} makes more than one batch group; the phase split assumes one")
    return {"host": host.describe(), "wall_s": wall, "kv_load_spans": sum(sp[0] == "kv_load" for sp in spans),
            "streams": sorted({sp[0] for sp in spans}), "ops": paired(tracer, hw, "float32", prefill_steps, blind),
            "tokens": [o.token_ids for o in outs]}


def summarize(ops) -> dict:
    per: dict[str, list] = {}
    for kind, meas, gap, pred, ov, cost, pred_blind in ops:
        per.setdefault(kind, []).append((meas / pred, ov, meas, pred, cost, (meas + gap) / pred, gap,
                                         (meas + gap) / pred_blind if pred_blind else None))
    out = {}
    for kind, rows in sorted(per.items()):
        ratios = [r[0] for r in rows]
        alone = [r[0] for r in rows if r[1] < ALONE]
        with_gap = [r[5] for r in rows]
        out[kind] = {"ops": len(rows), "median_measured_over_predicted": statistics.median(ratios),
                     "within_2x": sum(0.5 <= r <= 2.0 for r in ratios) / len(ratios),
                     "median_with_gap_over_predicted": statistics.median(with_gap),
                     "within_2x_with_gap": sum(0.5 <= r <= 2.0 for r in with_gap) / len(with_gap),
                     "median_gap_s": statistics.median(r[6] for r in rows),
                     "ops_alone": len(alone),
                     "median_alone": statistics.median(alone) if alone else None,
                     "median_overlap": statistics.median(r[1] for r in rows),
                     "median_measured_s": statistics.median(r[2] for r in rows),
                     "median_predicted_s": statistics.median(r[3] for r in rows),
                     "median_calls": statistics.median(r[4]["calls"] for r in rows)}
        blind = [r[7] for r in rows if r[7] is not None]
        if blind:  # the same ops priced by the fit blind to contention
            out[kind] |= {"median_with_gap_over_predicted_blind": statistics.median(blind),
                          "within_2x_with_gap_blind": sum(0.5 <= r <= 2.0 for r in blind) / len(blind)}
    return out


def main() -> None:  # noqa: C901 - a table printer
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--policy", default="klotski", choices=("klotski", "flexgen", "layerwise"))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--gpu-memory", default="48MiB", help="device budget (small: experts live in host memory)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both rows, in rotated order")
    ap.add_argument("--hardware", default=None, help="a profile JSON for every row (default: calibrate first)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (per lane: each host lane runs its own ops with this many)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: its profile and timings are not this machine's")
    if args.seqs < 2:
        raise SystemExit(f"--seqs must be at least 2 (two micro-batches), got {args.seqs}")
    from klotski.hardware import load_profile, measure_profile

    base = load_profile(args.hardware) if args.hardware else measure_profile(device="cpu")
    configs = [HostCompute("cpu", "cpu", "all"), HostCompute()]
    rows = {h.describe(): {"host": h.describe(), "runs": []} for h in configs}
    tokens, profiles = {}, []
    for r in range(args.repeats):
        hw, blind, fitted = (base, None, {}) if args.hardware else calibrated_profile(args, base)  # rows share it
        profiles.append({"profile": hw.to_dict(), "calibration_run": fitted})
        print(f"round {r + 1}: profile {hw.name} [{hw.source}], overhead {1e3 * hw.op_overhead_s:.3f} ms/call, "
              f"matmul {hw.matmul_flops['float32'] / 1e9:.1f} GFLOP/s, attention {hw.attention_flops / 1e9:.1f} "
              f"GFLOP/s, memory {hw.device_mem_bandwidth / 1e9:.2f} GB/s, contention {hw.contention:.2f}"
              + (f"; its calibration run: median op {fitted['median_measured_over_predicted']:.2f}, total "
                 f"{fitted['total_measured_over_predicted']:.2f} measured / predicted" if fitted else ""))
        if hw.kind_costs:
            print("  fitted per kind, ms per call + us per token: " + ", ".join(
                f"{k} {1e3 * c:.3f} + {1e6 * t:.2f}" for k, (c, t) in sorted(hw.kind_costs.items())))
        for h in configs[r % 2:] + configs[: r % 2]:
            got = run(args, h, hw, blind)
            rows[got["host"]]["runs"].append(got)
            tokens.setdefault(got["host"], got["tokens"])
    same = len({json.dumps(t) for t in tokens.values()}) == 1
    result = []
    for row in rows.values():
        runs = row["runs"]
        row = {"host": row["host"], "wall_s": [x["wall_s"] for x in runs],
               "kv_load_spans": [x["kv_load_spans"] for x in runs], "streams": runs[0]["streams"],
               "per_kind": summarize([op for x in runs for op in x["ops"]])}
        result.append(row)
        print(f"\n{row['host']}: wall {', '.join(f'{w:.2f}' for w in row['wall_s'])} s, KV-load spans "
              f"{row['kv_load_spans']}, streams {', '.join(row['streams'])}")
        print(f"  {'op@lane':<22} {'ops':>5} {'meas/pred':>9} {'within 2x':>9} {'alone':>5} {'meas/pred alone':>15} "
              f"{'overlap':>7} {'meas ms':>8} {'pred ms':>8} {'calls':>5} {'gap ms':>6} {'+gap/pred':>9} "
              f"{'within 2x':>9} {'blind':>5} {'within 2x':>9}")
        for k, v in row["per_kind"].items():
            alone = f"{v['median_alone']:.2f}" if v["median_alone"] is not None else "-"
            print(f"  {k:<22} {v['ops']:>5} {v['median_measured_over_predicted']:>9.2f} {v['within_2x']:>9.0%} "
                  f"{v['ops_alone']:>5} {alone:>15} {v['median_overlap']:>7.0%} {1e3 * v['median_measured_s']:>8.2f} "
                  f"{1e3 * v['median_predicted_s']:>8.2f} {v['median_calls']:>5} {1e3 * v['median_gap_s']:>6.2f} "
                  f"{v['median_with_gap_over_predicted']:>9.2f} {v['within_2x_with_gap']:>9.0%}"
                  + (f" {v['median_with_gap_over_predicted_blind']:>5.2f} {v['within_2x_with_gap_blind']:>9.0%}"
                     if "within_2x_with_gap_blind" in v else ""))
    kinds = [v for row in result for v in row["per_kind"].values()]
    within = {"with_contention": sum(0.5 <= v["median_with_gap_over_predicted"] <= 2 for v in kinds)}
    if all("median_with_gap_over_predicted_blind" in v for v in kinds):
        within["blind_to_contention"] = sum(0.5 <= v["median_with_gap_over_predicted_blind"] <= 2 for v in kinds)
    print(f"\nkind x phase medians (span + gap) within 2x of the prediction, of {len(kinds)}: "
          + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in within.items()))
    print(f"same greedy tokens with and without host compute: {same}")
    out = args.out or os.path.join("bench", "results", time.strftime("%Y%m%d") + "-host-compute-ops-cpu.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    command = "python bench/e2e/host_compute_ops.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)
    with open(out + ".tmp", "w") as f:
        json.dump({"command": command, "profiles": profiles, "same_tokens": same, "kinds_within_2x": within,
                   "rows": result}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
