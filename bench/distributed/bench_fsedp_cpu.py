"""FSE-DP on G CPU ranks (gloo) with the demo model: measured host bytes against what replicated offloading would
read for the same routing, device-to-device bytes, peak slots, and agreement with a single-process resident run.

On CPU the "host-to-device" load is a memcpy and the ranks share the same cores: wall times here say nothing about
multi-GPU speed (see predict_fsedp.py for predictions); the byte counts are exact.

    python bench/distributed/bench_fsedp_cpu.py [--nproc 2] [--prompts 8] [--max-tokens 8] [--slices 4 --slots 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from results import command_line, write_json
from klotski import LLM, SamplingParams
from klotski.cli.demo import DEFAULT_PROMPTS
from klotski.demo import ensure_demo_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--loader", default="balanced", choices=("balanced", "most_tokens"))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                    time.strftime("%Y%m%d") + "-fsedp-cpu.json"))
    args = ap.parse_args()
    model = ensure_demo_checkpoint()
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] + " " * (i // len(DEFAULT_PROMPTS))
               for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "klotski.distributed", "--model", model, "--max-tokens", str(args.max_tokens), "--ignore-eos",
               "--slices", str(args.slices), "--slots", str(args.slots), "--loader", args.loader, "--device", "cpu",
               "--json", out]
        for p in prompts:
            cmd += ["--prompt", p]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(out) as f:
            got = json.load(f)
    with LLM(model, device="cpu", dtype="float32") as llm:
        ref = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                                        ignore_eos=True))]
    ranks = got["ranks"]
    host = sum(m["host_bytes"] for m in ranks)
    repl = sum(m["replicated_host_bytes"] for m in ranks)
    print(f"{'rank':>4} {'host MiB':>9} {'replicated MiB':>15} {'d2d sent MiB':>13} {'peak slots':>11} {'forwards':>9}")
    for m in ranks:
        print(f"{m['rank']:>4} {m['host_bytes'] / 2**20:>9.2f} {m['replicated_host_bytes'] / 2**20:>15.2f} "
              f"{m['d2d_bytes_sent'] / 2**20:>13.2f} {m['peak_slots']:>7}/{m['slots']:<3} {m['forwards']:>9}")
    agree = got["outputs"] == ref
    print(f"all ranks: host {host / 2**20:.2f} MiB vs replicated offloading {repl / 2**20:.2f} MiB "
          f"(ratio {host / repl:.3f}); greedy tokens equal the resident run: {agree}; wall {wall:.1f} s "
          f"(torchrun start-up included)")
    result = dict(command=command_line("bench_fsedp_cpu.py", args),
        model=model, ranks=ranks, host_bytes=host, replicated_host_bytes=repl, host_ratio=host / repl,
        tokens_equal_resident=agree, wall_s=wall)
    write_json(args.json, result)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
