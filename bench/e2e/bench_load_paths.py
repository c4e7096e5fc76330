"""End to end: an offloaded run's tokens/s with each disk-load path (one native call per record vs the torch
path) and read engine, paired in one invocation, with the same plan and the same greedy tokens.

    python bench/e2e/bench_load_paths.py --policy klotski --gpu-memory 16MiB --cpu-memory 8MiB \
        --out bench/results/load_paths_e2e_cpu.json

Model: the shipped demo model (``--model DIR`` for another). Every variant plans with one fixed hardware
profile (``--hardware``, default: this machine's cached one), so runs differ only in how disk-resident weights
are loaded (``KLOTSKI_LOAD_PATH`` / ``KLOTSKI_LOAD_ENGINE``, read when the runtime is built). The variants run
in turn, the order rotated per repetition; each run builds a new ``LLM`` over one shared offload directory
(converted once, before the timed runs), generates, and reports ``metrics.tokens_per_s`` and the load counters.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

from klotski import LLM, SamplingParams
from klotski.demo import ensure_demo_checkpoint
from klotski.hardware import get_hardware, load_profile


def run(args, variant: str, hardware, offload_dir: str, prompts) -> dict:
    load_path, engine = variant.split("/")
    os.environ["KLOTSKI_LOAD_PATH"], os.environ["KLOTSKI_LOAD_ENGINE"] = load_path, engine
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    with LLM(args.model, device="cpu", policy=args.policy, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
             offload_dir=offload_dir, num_batches=args.num_batches, batch_size=args.batch_size,
             hardware=hardware) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        m = llm.metrics
        extra = m.extra
        return {"tokens_per_s": m.tokens_per_s, "tokens": [o.token_ids for o in outs],
                "disk_loads_native": extra["disk_loads_native"], "disk_loads_torch": extra["disk_loads_torch"],
                "bytes_disk_read": extra["bytes_disk_read"], "placement": extra["placement"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--policy", default="klotski")
    p.add_argument("--gpu-memory", default="16MiB")
    p.add_argument("--cpu-memory", default="8MiB")
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variants", default="native/threads,torch/sync")
    p.add_argument("--hardware", default=None, help="a hardware profile JSON or preset (default: the cached one)")
    p.add_argument("--out", default="bench/results/load_paths_e2e_cpu.json")
    args = p.parse_args(argv)
    args.model = args.model or ensure_demo_checkpoint()
    hardware = get_hardware(args.hardware) if args.hardware else load_profile()
    variants = [v.strip() for v in args.variants.split(",")]
    n = args.num_batches * args.batch_size
    prompts = [[(7 * i + 3 * j) % 1000 + 10 for j in range(args.prompt_len)] for i in range(n)]
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    saved = {k: os.environ.get(k) for k in ("KLOTSKI_LOAD_PATH", "KLOTSKI_LOAD_ENGINE")}
    try:
        with tempfile.TemporaryDirectory(prefix="klotski-load-paths-") as tmp:
            offload_dir = os.path.join(tmp, "off")
            run(args, variants[0], hardware, offload_dir, prompts)  # converts the store; warms the caches
            for rep in range(args.repeat):
                for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                    samples[v].append(run(args, v, hardware, offload_dir, prompts))
                    print(f"rep {rep} {v}: {samples[v][-1]['tokens_per_s']:.2f} tokens/s, native loads "
                          f"{samples[v][-1]['disk_loads_native']}, torch loads {samples[v][-1]['disk_loads_torch']}",
                          flush=True)
    finally:
        for k, val in saved.items():
            os.environ.pop(k, None) if val is None else os.environ.__setitem__(k, val)
    ref = samples[variants[0]][0]["tokens"]
    same = all(s["tokens"] == ref for runs in samples.values() for s in runs)
    rows = [{"variant": v, "tokens_per_s": statistics.median(s["tokens_per_s"] for s in runs),
             "tokens_per_s_runs": [round(s["tokens_per_s"], 3) for s in runs],
             "disk_loads_native": runs[0]["disk_loads_native"], "disk_loads_torch": runs[0]["disk_loads_torch"],
             "bytes_disk_read": runs[0]["bytes_disk_read"], "placement": runs[0]["placement"]}
            for v, runs in samples.items()]
    print("| variant | tokens/s (median) | runs | native loads | torch loads | disk bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s_runs']} | {r['disk_loads_native']} | "
              f"{r['disk_loads_torch']} | {r['bytes_disk_read']} |")
    print(f"greedy tokens identical across all runs: {same}")
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "tokens_identical": same,
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
