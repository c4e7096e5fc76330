"""``klotski plan``: the best plan for a model on a machine, and a per-policy comparison (no weights needed)."""
from __future__ import annotations

import json
import os
import time

from klotski.cli.options import add_expert_selection_arg
from klotski.units import format_bytes


def add_parser(sub):
    p = sub.add_parser("plan", help="plan batch size, n and placement from the cost model (no weights needed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (its config.json is read)")
    src.add_argument("--preset", help="built-in model: " + ", ".join(_model_names()))
    p.add_argument("--hardware", default=None,
                   help="hardware preset name or profile JSON (default: the cached `klotski profile` result)")
    p.add_argument("--gpu-memory", default=None, help="GPU memory limit, e.g. 24GiB (default: the profile's)")
    p.add_argument("--cpu-memory", default=None, help="pinned CPU memory limit, e.g. 256GiB")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--policy", default="klotski", choices=("klotski", "flexgen", "layerwise", "resident"))
    p.add_argument("--dtype", default=None, help="weight dtype override (bfloat16, float16, float8_e4m3, int4)")
    p.add_argument("--routing", default=None,
                   help="routing-count JSON (per-expert and cross-layer counts) for expert popularity")
    p.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of one decode step")
    p.add_argument("--timeline", default=None, help="write a PNG timeline of one decode step")
    p.add_argument("--json", default=None, help="write the plans as JSON")
    p.add_argument("--host", default="search", choices=("search", "off"),
                   help="search: also place attention per phase on the CPU (over a KV cache in host memory) and "
                        "compute cold experts on the CPU when cheaper; off: everything on the device")
    add_expert_selection_arg(p)  # decode steps planned with the fewer experts it leaves
    p.add_argument("--devices", type=int, default=1,
                   help="> 1: predict FSE-DP vs expert parallelism vs replicated offloading on this many devices")
    p.add_argument("--device-batch", type=int, default=16, help="with --devices: sequences per device")
    p.add_argument("--slices", type=int, default=4, help="with --devices: slices per expert (FSE-DP streaming)")
    p.add_argument("--slots", type=int, default=4, help="with --devices: slice buffers per device")
    return p


def _model_names():
    from klotski.presets import MODEL_CONFIGS

    return list(MODEL_CONFIGS)


def load_costs(args):
    from klotski.costs import ModelCosts, weight_dtype_of
    from klotski.presets import model_config

    if args.model:
        path = os.path.join(args.model, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {args.model!r} (expected {path})")
        with open(path) as f:
            config = json.load(f)
        name = os.path.basename(os.path.normpath(args.model))
    else:
        config, name = model_config(args.preset), args.preset
    return ModelCosts.from_config(config, name=name, weight_dtype=args.dtype or weight_dtype_of(config))


def load_hardware(args):
    from klotski.hardware import get_hardware, load_profile

    from klotski.units import parse_bytes

    hw = get_hardware(args.hardware) if args.hardware else load_profile()
    if args.gpu_memory is not None and parse_bytes(args.gpu_memory) > hw.gpu_memory:
        raise ValueError(f"--gpu-memory {args.gpu_memory} is more than the {format_bytes(hw.gpu_memory)} of device "
                         f"memory of {hw.name} ({hw.device_name}): a plan for it could not run there")
    return hw.with_memory(gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory)


def _cached_profile(cache):
    """This machine's cached profile (the GPU's when one was profiled, else the CPU's)."""
    for device in ("cuda", "cpu"):
        hw = cache.load(device)
        if hw is not None:
            return hw
    raise FileNotFoundError(f"no cached hardware profile in {cache.root} (run `klotski profile`, or pass "
                            f"--hardware with a preset name or a profile JSON)")


def policy_table(plans: dict) -> str:
    head = (f"{'policy':<10} {'tokens/s':>9} {'batch':>6} {'n':>4} {'bubble':>7} {'prefill s':>10} "
            f"{'decode ms':>10} {'GPU peak':>11} {'CPU peak':>11} {'H2D/step':>11} {'disk/step':>11} "
            f"{'attn pre/dec':>12} {'cpu experts':>11}")
    rows = [head, "-" * len(head)]
    for policy, plan in plans.items():
        if plan is None:
            rows.append(f"{policy:<10} {'does not fit':>9}")
            continue
        moved = plan.bytes_per_step
        rows.append(
            f"{policy:<10} {plan.tokens_per_s:>9.2f} {plan.batch_size:>6} {plan.n:>4} {plan.bubble_fraction:>7.1%} "
            f"{plan.prefill_s:>10.2f} {plan.decode_step_s * 1e3:>10.1f} {format_bytes(plan.peak_mem['gpu']):>11} "
            f"{format_bytes(plan.peak_mem['cpu']):>11} {format_bytes(moved.get('h2d', 0)):>11} "
            f"{format_bytes(moved.get('disk', 0)):>11} {plan.host.prefill_attn + '/' + plan.host.decode_attn:>12} "
            f"{plan.host.experts:>11}")
    return "\n".join(rows)


def run(args) -> int:
    from klotski.planner import InfeasibleError, Planner
    from klotski.routing_stats import RoutingStats

    t0 = time.perf_counter()
    costs = load_costs(args)
    hw = load_hardware(args)
    spec = costs.spec
    routing = None
    if args.routing:
        routing = RoutingStats.from_trace_file(args.routing)
        if routing.num_experts != spec.num_experts or routing.top_k != spec.top_k:
            raise ValueError(f"{args.routing}: routing for {routing.num_experts} experts top-{routing.top_k}, "
                             f"model has {spec.num_experts} top-{spec.top_k}")
    print(f"model     {costs.name}: {spec.num_layers} layers, {spec.num_experts} experts top-{spec.top_k}, "
          f"{format_bytes(costs.total_bytes)} of {costs.weight_dtype} weights")
    print(f"hardware  {hw.summary()}")
    decode_routing, selection = None, getattr(args, "expert_selection", "off") or "off"
    if selection != "off":
        from klotski.model.expert_selection import ExpertSelection  # (imports torch: only when asked for)

        sel = ExpertSelection.parse(selection)
        if sel.enabled and spec.num_experts:
            decode_routing = (routing or RoutingStats.uniform(spec.num_experts, max(spec.top_k, 1))).with_selection(
                sel.aggressiveness, sel.offload_aware)
        selection = str(sel)
    print(f"workload  prompt {args.prompt_len}, generate {args.gen_len}"
          + (f", expert selection {selection} on decode steps" if selection != "off" else ""))
    if args.devices > 1:
        from klotski.distributed.plan_report import run_devices

        return run_devices(args, costs, hw, routing)
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    planner = Planner(costs, hw, args.prompt_len, args.gen_len, routing, decode_routing=decode_routing,
                      host=getattr(args, "host", "search"))
    plans = planner.compare()
    best = plans.get(args.policy)
    if best is None:
        err = planner.infeasible(args.policy)
        print(policy_table(plans))
        raise InfeasibleError(str(err), err.min_gpu_memory, err.min_cpu_memory)
    print(f"\nplan ({args.policy}):")
    print(best.describe(spec.num_experts))
    print("\npolicy comparison (each policy with its own best batch size, n and placement):")
    print(policy_table(plans))
    print(f"\nplanned in {time.perf_counter() - t0:.2f} s")
    if args.trace or args.timeline:
        from klotski.schedule import build_schedule
        from klotski.simulate import simulate
        from klotski.trace import write_chrome_trace, write_timeline_png

        _, dec = planner.shapes(best.batch_size, best.n)
        from klotski.program import order_of
        from klotski.program.host import ExpertRule

        sched = build_schedule(order_of(best.policy, best.num_hot), costs, best.placement, dec, planner.decode_routing,
                               num_hot=best.num_hot, overlap=best.overlap, host=best.host,
                               expert_rule=ExpertRule(costs, hw))
        res = simulate(sched, hw, dtype=costs.act_dtype)
        if args.trace:
            write_chrome_trace(sched, res, args.trace)
            print(f"trace: {args.trace}")
        if args.timeline:
            write_timeline_png(sched, res, args.timeline)
            print(f"timeline: {args.timeline}")
    if args.json:
        out = {p: None if v is None else {
            "policy": v.policy, "batch_size": v.batch_size, "n": v.n, "tokens_per_s": v.tokens_per_s,
            "bubble_fraction": v.bubble_fraction, "prefill_s": v.prefill_s, "decode_step_s": v.decode_step_s,
            "peak_mem": v.peak_mem, "bytes_per_step": v.bytes_per_step, "num_hot": v.num_hot,
            "placement": v.placement.__dict__, "host": v.host.__dict__} for p, v in plans.items()}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def main(argv=None) -> int:  # standalone: python -m klotski.cli.plan ...
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="klotski")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"klotski plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
