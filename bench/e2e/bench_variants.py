"""Every plan variant the planner can emit, run and held out against its calibrated prediction.

    python bench/e2e/bench_variants.py --layers 8 --gpu-memory 64MiB --cpu-memory 24MiB

For each (policy, variant) -- flexgen with and without overlap, klotski in FlexGen's order (num_hot=None),
after the gates (top_k hot) and wide-early (all experts hot, issued with the next layer's weights) -- the
planner is restricted to that variant (it still chooses batch size, n and placement), the model runs once
(the profile is fitted to that run's per-op timings), then again on other prompts, and the second run's
tokens/s is compared with the prediction of the calibrated profile: the single schedule means the simulator
times the ops the runtime executes, so every variant should be within 15 %. Prints a table and writes JSON
under bench/results/. The planner restriction is this script's (a context manager around
``Planner.variants``); the runtime is untouched.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time

import torch


def _bench_offload():
    spec = importlib.util.spec_from_file_location("bench_offload", os.path.join(os.path.dirname(__file__),
                                                                                "bench_offload.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def only_variant(variant):
    """The planner considers ``variant`` = (num_hot, overlap) only, inside the block."""
    from klotski.planner import Planner

    real = Planner.variants
    Planner.variants = lambda self, policy: [variant]
    try:
        yield
    finally:
        Planner.variants = real


def main() -> None:
    bo = _bench_offload()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bo.add_model_args(ap, layers=8, gpu_memory="64MiB", cpu_memory="24MiB")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = ap.parse_args()
    from klotski import LLM, SamplingParams
    from klotski.runtime.planning import machine_profile

    work = tempfile.mkdtemp(prefix="klotski-variants-")
    atexit.register(shutil.rmtree, work, True)
    model = os.path.join(work, "model")
    bo.build_checkpoint(model, args)
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    hw = machine_profile(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    K, E = args.top_k, args.experts
    variants = [("flexgen", "overlap", (None, True)), ("flexgen", "no-overlap", (None, False)),
                ("klotski", "flexgen-order", (None, True)), ("klotski", "after-gates", (K, False)),
                ("klotski", "wide-early", (E, True))]
    rows, tokens = [], {}
    for policy, name, variant in variants:
        with only_variant(variant):
            llm = LLM(model, device=args.device, policy=policy, gpu_memory=args.gpu_memory,
                      cpu_memory=args.cpu_memory, offload_dir=os.path.join(work, "store"), hardware=hw)
            count = llm.session.group_size
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, llm.spec.vocab_size, (2 * count, args.prompt_len), generator=g).tolist()
            llm.generate(prompt_token_ids=prompts[:1], sampling_params=sp)  # warm-up (prefetch table)
            outs, first = bo.timed_run(llm, prompts[:count], sp, hw)
            llm.session.calibrate(hw, save=False)  # fitted on the first run: the session now predicts with it
            outs2, row = bo.timed_run(llm, prompts[count:], sp, hw)
            plan = llm.session.plan
            llm.close()
        tokens[f"{policy}/{name}"] = [o.token_ids for o in outs]
        row.update(policy=policy, variant=name, plan_num_hot=plan.num_hot, plan_overlap=plan.overlap,
                   first_run_tokens_per_s=first["tokens_per_s"])
        rows.append(row)
        print(f"{policy}/{name}: {row['tokens_per_s']:.2f} tokens/s", flush=True)
    print(f"{'policy':<9} {'variant':<14} {'b x n':>6} {'tok/s':>8} {'pred':>8} {'err':>6}  placement")
    for r in rows:
        pred = r["predicted_tokens_per_s"]
        r["error"] = r["tokens_per_s"] / pred - 1 if pred else None
        print(f"{r['policy']:<9} {r['variant']:<14} {r['batch_size']:>2}x{r['num_batches']:<3} {r['tokens_per_s']:>8.2f} "
              f"{pred:>8.2f} {r['error']:>+6.0%}  {r['placement']}")
    common = min(len(t) for t in tokens.values())  # group sizes differ: compare the prompts every variant ran
    ref = next(iter(tokens.values()))[:common]
    same = all(t[:common] == ref for t in tokens.values())
    within = all(r["error"] is not None and abs(r["error"]) <= 0.15 for r in rows)
    print(f"greedy tokens identical across variants: {same}; every variant within 15 % of its held-out "
          f"prediction: {within}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e-variants-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "tokens_identical": same, "within_15_percent": within}, f,
                  indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
