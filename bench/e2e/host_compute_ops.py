"""CPU mode, host compute forced on: per-op measured seconds (the run's trace) next to the cost model's
prediction on the profile the run was planned with, per op kind; and whether any KV-load span remains.

    python bench/e2e/host_compute_ops.py --model DIR [--policy klotski --prompt-len 256 --gen-len 8 --seqs 8]

(make a model with ``python bench/e2e/make_checkpoint.py mixtral-8x7b DIR --layers 4 --dtype float32 --override
hidden_size=512 --override intermediate_size=1536 --override num_attention_heads=8 --override
num_key_value_heads=2 --override head_dim=64 --override vocab_size=1024``). Runs twice: attention and cold
experts on the CPU (``HostCompute("cpu", "cpu", "all")``) and everything on the device, both with the KV cache
in host memory; prints a table and writes JSON under bench/results/. Do not run under TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from klotski import LLM, SamplingParams
from klotski.costs import op_seconds
from klotski.program.host import HostCompute
from klotski.runtime import OffloadedSession
from klotski.schedule import Op


def predicted(span, hw, dtype: str) -> tuple[str, float] | None:
    """(op kind, predicted seconds) of a traced span, or None when the span is not a compute op."""
    stream, _, _, _, args = span
    kind = args.get("op")
    if kind is None:
        return None
    device = "cpu" if stream in ("cpu_attn", "cpu_experts") else "gpu"
    op = Op(0, kind, stream, device, 0, flops=float(args.get("flops", 0.0)),
            score_flops=float(args.get("score_flops", 0.0)), bytes=int(args.get("kv_bytes", 0)),
            calls=int(args.get("calls", args.get("experts", 1)) or 1))
    return f"{kind}@{stream}", op_seconds(op, hw, dtype)


def run(args, host) -> dict:
    prompts = [[(7 * i + j) % 500 + 3 for j in range(args.prompt_len)] for i in range(args.seqs)]
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    with LLM(args.model, device="cpu", dtype="float32") as llm:
        llm.session.close()
        llm.session = OffloadedSession(llm.weights, torch.device("cpu"), torch.float32, args.policy,
                                       args.gpu_memory, None, None, num_batches=2, batch_size=args.seqs // 2,
                                       kv="cpu", host_compute=host)
        hw = llm.session.run_plan.hardware  # the profile the run was planned with (before any feedback)
        llm.generate(prompt_token_ids=prompts, sampling_params=sp)  # warm-up run (the profile's feedback)
        llm.session.reset_metrics()
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        wall = time.perf_counter() - t0
        spans = list(llm.executor.tracer.spans)
        tokens = [o.token_ids for o in outs]
    per: dict[str, list[float]] = {}
    for span in spans:
        got = predicted(span, hw, "float32")
        if got is not None and got[1] > 0:
            per.setdefault(got[0], []).append((span[3] - span[2]) / got[1])
    kinds = {k: {"ops": len(v), "median_measured_over_predicted": statistics.median(v),
                 "within_2x": sum(0.5 <= r <= 2.0 for r in v) / len(v)} for k, v in sorted(per.items())}
    return {"host": host.describe(), "wall_s": wall, "kv_load_spans": sum(s[0] == "kv_load" for s in spans),
            "streams": sorted({s[0] for s in spans}), "per_kind": kinds, "tokens": tokens,
            "profile": f"{hw.name} [{hw.source}]"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--policy", default="klotski", choices=("klotski", "flexgen", "layerwise"))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--gpu-memory", default="48MiB", help="device budget (small: experts live in host memory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: its profile and timings are not this machine's")
    rows = [run(args, HostCompute("cpu", "cpu", "all")), run(args, HostCompute())]
    same = rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        print(f"\n{r['host']}: wall {r['wall_s']:.2f} s, KV-load spans {r['kv_load_spans']}, streams "
              f"{', '.join(r['streams'])}; profile {r['profile']}")
        print(f"  {'op@lane':<24} {'ops':>5} {'measured/predicted (median)':>28} {'within 2x':>10}")
        for k, v in r["per_kind"].items():
            print(f"  {k:<24} {v['ops']:>5} {v['median_measured_over_predicted']:>28.2f} {v['within_2x']:>10.0%}")
    print(f"\nsame greedy tokens with and without host compute: {same}")
    out = args.out or os.path.join("bench", "results", time.strftime("%Y%m%d") + "-host-compute-ops-cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for r in rows:
        r.pop("tokens")
    with open(out + ".tmp", "w") as f:
        json.dump({"command": "python bench/e2e/host_compute_ops.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), "same_tokens": same,
            "rows": rows}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
