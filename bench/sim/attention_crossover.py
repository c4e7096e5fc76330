"""Where decode attention moves to the CPU: the planner's choice against two analytic crossovers, per context length.

    python bench/sim/attention_crossover.py [--model mixtral-8x7b --hardware t4 rtx3090 --batches 1 4 16 64]

For every hardware preset, policy / group size and batch size, and every mean decode context L on a grid of powers
of two (prompt ``--prompt-len``, generation long enough that the mean decode context is L, host memory ample so
the KV never pushes experts to disk), three answers to "decode attention on the CPU?":

* **planner**: ``Planner(host="search").evaluate(...)`` (the weights placed, cold experts ``off`` or ``auto``,
  each phase's attention by its simulated step time: the pipeline with every dependency);
* **roofline**: for the planner's placement and cold-expert mode, the step whose busiest resource (h2d link, d2h
  link, device compute, host CPU) is less busy (``SimResult.roofline``): copying the KV costs link time, reading
  it in host memory costs CPU time, and every op overlaps perfectly;
* **isolated**: one layer with nothing overlapped (``klotski.program.host.attention_seconds``): KV copy in +
  device attention + the new columns out, against Q/K/V out + CPU attention over the host KV + the output back.

In every configuration of the default sweep the planner moves no later than the roofline crossover and no
earlier than the earlier of the two analytic ones (tests/planner/test_host_compute.py asserts it for three).

The column shows the first L of the grid where each says "cpu" (``-``: never) and the planner's choices as a string
(g / c per grid point); "roofline's choice costs" is the most a decode step would take longer, over the grid, if
decode attention followed the roofline instead of the planner (under 0.1 %: the two placements tie there, and
which one the planner takes is immaterial). PREDICTIONS of the cost model on preset hardware, not measurements. Writes JSON and markdown
under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from klotski.costs import ModelCosts, weight_dtype_of
from klotski.hardware import preset
from klotski.planner import Planner
from klotski.presets import model_config
from klotski.program.host import HostCompute, attention_seconds


def first_cpu(grid, choices):
    return next((L for L, c in zip(grid, choices) if c == "cpu"), None)


def sweep(costs, hw, policy, n, b, grid, prompt):
    num_hot = costs.spec.top_k if policy == "klotski" else None
    planner_c, roof_c, iso_c, regret = [], [], [], 0.0
    for L in grid:
        pl = Planner(costs, hw, prompt, 2 * (L - prompt) + 2, host="search")
        plan = pl.evaluate(policy, b, n, "cpu", num_hot, False)
        if plan is None:
            planner_c.append("x"); roof_c.append("x"); iso_c.append("x")  # noqa: E702
            continue
        sims = {a: pl.simulate(policy, plan.placement, b, n, num_hot, False, HostCompute(a, a, plan.host.experts))[1]
                for a in ("gpu", "cpu")}
        planner_c.append(plan.host.decode_attn)
        roof_c.append("cpu" if sims["cpu"].roofline < sims["gpu"].roofline else "gpu")
        # what following the roofline instead would cost this decode step (0 where they agree)
        regret = max(regret, sims[roof_c[-1]].makespan / sims[planner_c[-1]].makespan - 1)
        dev, host = (attention_seconds(costs, hw, b, L, d) for d in ("gpu", "cpu"))
        iso_c.append("cpu" if host < dev else "gpu")
    return planner_c, roof_c, iso_c, regret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", nargs="*", default=["t4", "rtx3090"])
    ap.add_argument("--configs", nargs="*", default=["klotski:4", "flexgen:4", "klotski:1"], help="policy:n")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-log2", type=int, default=15, help="grid: prompt-len ... 2**max-log2, powers of two")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-attention-crossover.json)")
    args = ap.parse_args()
    cfg = model_config(args.model)
    costs = ModelCosts.from_config(cfg, name=args.model, weight_dtype=weight_dtype_of(cfg))
    grid = [2 ** i for i in range(args.max_log2 + 1) if 2 ** i >= args.prompt_len]
    rows = []
    lines = ["| hardware | policy | n | batch | planner | roofline | isolated | planner choices (g/c per L) "
             "| roofline's choice costs |", "|---|---|---|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for hw_name in args.hardware:
        hw = preset(hw_name).with_memory(cpu_memory="2TiB")
        for conf in args.configs:
            policy, n = conf.split(":")[0], int(conf.split(":")[1])
            for b in args.batches:
                planner_c, roof_c, iso_c, regret = sweep(costs, hw, policy, n, b, grid, args.prompt_len)
                row = dict(hardware=hw_name, policy=policy, n=n, batch_size=b, grid=grid, planner=planner_c,
                           roofline=roof_c, isolated=iso_c, planner_flip=first_cpu(grid, planner_c),
                           roofline_flip=first_cpu(grid, roof_c), isolated_flip=first_cpu(grid, iso_c),
                           roofline_choice_cost=regret)
                rows.append(row)
                fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
                lines.append(f"| {hw_name} | {policy} | {n} | {b} | {fmt(row['planner_flip'])} | "
                             f"{fmt(row['roofline_flip'])} | {fmt(row['isolated_flip'])} | "
                             f"{''.join(c[0] for c in planner_c)} | {100 * regret:.2f} % |")
                print(lines[-1], flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "results",
                                   time.strftime("%Y%m%d") + "-attention-crossover.json")
    doc = dict(command="python bench/sim/attention_crossover.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), model=args.model, prompt_len=args.prompt_len,
        kind="prediction (cost model + simulator on presets), not a measurement", rows=rows,
        seconds=round(time.perf_counter() - t0, 1))
    md = "\n".join([f"`{doc['command']}` (predictions)", ""] + lines) + "\n"
    for path, text in ((out, json.dumps(doc, indent=1)), (out[:-5] + ".md", md)):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # no half-written result that looks complete
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
