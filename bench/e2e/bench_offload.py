"""End-to-end offloaded generation: every policy on one random-weight checkpoint under a memory budget.

    python bench/e2e/bench_offload.py                          # CPU: Mixtral-shaped small model, budget << model
    python bench/e2e/bench_offload.py --hidden 4096 --inter 14336 --layers 4 --gpu-memory 24GB   # on a GPU
    python bench/e2e/bench_offload.py --preset qwen3-30b-a3b --layers 24 --gpu-memory 24GB --cpu-memory 48GB \
        --prompt-len 512 --gen-len 32 --baseline accelerate --calibrate       # a real model's shapes, on a GPU

Prints tokens/s, bubble fraction, bytes per tier and peak memory per policy, next to the planner's predicted
tokens/s for the same placement (klotski.planner scored on a measured hardware profile), and writes JSON
to bench/results/. Greedy tokens of every policy are checked against each other.

``--preset NAME`` (a klotski.presets model: qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, ...) writes a
random-weight checkpoint of that model's shapes with bench/e2e/make_checkpoint.py (streamed tensor by tensor,
values drawn on the GPU when there is one), truncated to ``--layers`` (all of the model's layers without it),
in ``--dtype``; ``--model DIR`` reuses an existing checkpoint; neither: the small Mixtral-shaped default.
Each policy's packed expert store is deleted once the policy has run (the disk holds the checkpoint and one
store at a time), and the JSON is rewritten after every policy (a run cut short keeps the rows it finished).

``--quantize int4 [--group-size 128]`` runs every policy twice in the one invocation, on the same checkpoint,
budgets and prompts: over the checkpoint's experts, then over int4 experts (``klotski convert --quantize int4``
into the policy's store, ``LLM(..., quantization="int4")``); the table gets a ``quant`` column, bytes read per
generated token, and an int4 / checkpoint-dtype tokens/s ratio per policy (target >= 2x when disk-bound).

``--expert-selection off,lynx:A,lynx-offload:A`` runs klotski once more per setting (``LLM(...,
expert_selection=...)``), paired on the same checkpoint, prompts and budgets: expert bytes loaded per decode
step and tokens/s against the "off" row (bench/e2e/selection_rows.py; target >= 25 % fewer, offload-aware
>= 10 % fewer than plain). ``--hardware rtx3090`` (a preset or profile JSON) plans every variant on that fixed
profile instead of this machine's: on this CPU the planner rarely makes experts GPU-resident, on the preset a
budget such as ``--gpu-memory 48MiB`` for the demo model keeps 4 of its 8 experts per layer resident.

``--host-compute-off`` runs klotski once more with ``host_compute="off"`` (every op on the device), paired with
its default row (``"auto"``: on CUDA the planner chooses attention per phase and cold experts on the CPU; the
table's ``host`` column shows the choice): tokens/s with and without host compute, greedy tokens compared.

Every variant plans on one profile (``--hardware``, or this machine's: when no run has calibrated it, as in a
fresh cache, it is first fitted to a run of the first policy on the workload's lengths, so no variant plans on the
raw measurement).

``--baseline accelerate`` adds the baseline users know, HF transformers + accelerate ``device_map="auto"``
offloading (bench/e2e/accelerate_baseline.py) on the same checkpoint, prompts, budgets and compute dtype: one
more row, a "klotski / accelerate" speedup and whether its greedy tokens match. It needs the ``bench`` extra
(``pip install -e ".[bench]"``, accelerate==1.15.0); the package and its tests do not.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offload_report  # noqa: E402
import selection_rows  # noqa: E402


def build_checkpoint(path: str, args) -> None:
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=max(1, args.heads // 4), num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if p.ndim == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else std) + (1.0 if p.ndim == 1 else 0.0))
    model.to(getattr(torch, args.dtype)).save_pretrained(path)


def load_make_checkpoint():
    """bench/e2e/make_checkpoint.py as a module (bench scripts are not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_checkpoint.py")
    spec = importlib.util.spec_from_file_location("make_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def preset_checkpoint(path: str, args) -> dict:
    """Make (or, with --checkpoint-dir holding a finished one, reuse) the random checkpoint of ``args.preset``;
    returns what the JSON records about it."""
    info = {"preset": args.preset, "layers": args.layers, "overrides": dict(args.override)}
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        print(f"reusing the checkpoint in {path}")
        return {**info, "reused": True}
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)  # an empty directory given by --checkpoint-dir: make_checkpoint creates it
    mc = load_make_checkpoint()
    device = args.gen_device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = mc.make_checkpoint(path, args.preset, layers=args.layers, dtype=args.dtype, device=device,
                           shard_size=args.shard_size, seed=0, overrides=dict(args.override))
    return {**info, "reused": False, "make_s": r.seconds, "make_gb_per_s": r.gb_per_s, "num_tensors": r.num_tensors,
            "gen_device": device, "notes": r.notes}


def timed_run(llm, prompts, sp, hw):
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t
    m = llm.metrics
    row = {"tokens_per_s": m.tokens_per_s, "wall_s": wall, "generated_tokens": m.generated_tokens, **dict(m.extra)}
    row["roofline"] = roofline(llm.executor, hw, row, m.generated_tokens, m.total_s)
    spans = llm.executor.tracer.spans
    row["cold_loads"] = sum(1 for span in spans if span[0] == "expert_io")  # loads started after a gate
    row["prefetch_loads"] = sum(1 for span in spans if span[0] == "prefetch")
    return outs, row


def roofline(ex, hw, row: dict, tokens: int, seconds: float) -> dict:
    """The run's roofline on the profile the plan was made on (measured rates, not calibrated): the longest
    of its disk reads / disk bandwidth, its CPU->GPU bytes / H2D bandwidth and its FLOPs / matmul and
    attention rates (FLOPs summed over the traced compute ops). ``fraction`` = roofline time / measured time."""
    dtype = str(ex.dtype).replace("torch.", "")
    flops = sum(a.get("flops", 0.0) for st, _, _, _, a in ex.tracer.spans if st == "compute")
    score = sum(a.get("score_flops", 0.0) for st, _, _, _, a in ex.tracer.spans if st == "compute")
    t = {"disk_s": row["bytes_disk_read"] / hw.disk_bandwidth,
         "h2d_s": (row["bytes_h2d"] + row["bytes_kv_h2d"]) / hw.h2d_bandwidth,
         "compute_s": flops / hw.matmul_rate(dtype) + score / hw.attention_flops}
    bound = max(t, key=t.get)
    return {**t, "bound": bound.removesuffix("_s"), "fraction": t[bound] / seconds if seconds else 0.0,
            "roofline_tokens_per_s": tokens / t[bound] if t[bound] else 0.0}


def accelerate_row(model: str, runs: dict, args, tokens: dict, work: str) -> dict:
    """HF transformers + accelerate offloading on klotski's prompts (the first policy's without klotski),
    budgets, device and compute dtype; its greedy tokens compared with that policy's."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_baseline.py")
    spec = importlib.util.spec_from_file_location("accelerate_baseline", path)
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # its dataclass looks its module up there
    spec.loader.exec_module(baseline)
    ref_policy = "klotski" if "klotski" in runs else next(iter(runs))
    run, ref = runs[ref_policy], tokens[ref_policy]
    r = baseline.run_accelerate(model, run["prompts"], args.gen_len, device=run["device"],
                                gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, dtype=run["dtype"],
                                offload_dir=work)
    matching = sum(a == b for a, b in zip(r.token_ids, ref))
    first = next(((i, j) for i, (a, b) in enumerate(zip(r.token_ids, ref)) for j, (x, y) in enumerate(zip(a, b))
                  if x != y), None)
    return {"policy": "accelerate", "baseline": True, "num_prompts": len(run["prompts"]), **r.to_dict(),
            "tokens_compared_with": ref_policy, "tokens_match": matching == len(ref) == len(r.token_ids),
            "sequences_matching": matching, "first_mismatch": first}


def add_model_args(ap, layers, gpu_memory: str, cpu_memory: str) -> None:
    """The random Mixtral-shaped checkpoint's shapes (:func:`build_checkpoint`), the device and the budgets."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=layers,
                    help="layers of the default model (4) or of --preset (all)" if layers is None else None)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-memory", default=gpu_memory)
    ap.add_argument("--cpu-memory", default=cpu_memory)


def calibrated_first(model: str, args, policy: str, hw, work: str):
    """``hw`` (this machine's profile, no run has calibrated it: a fresh cache) fitted to a run of ``policy``
    first, at the workload's prompt and generation lengths, so every variant plans on corrected rates (the raw
    measurement predicted this bench's runs 3-4x too fast). Under the Triton interpreter, ``hw`` as it is."""
    from klotski import LLM, SamplingParams
    from klotski.profile_cache import interpreter_on

    if interpreter_on():
        return hw
    store = os.path.join(work, "store-calibrate")
    llm = LLM(model, device=args.device, policy=policy, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
              offload_dir=store, hardware=hw)
    try:
        g = torch.Generator().manual_seed(2)
        prompts = torch.randint(0, llm.spec.vocab_size, (llm.session.group_size, args.prompt_len), generator=g)
        sp = SamplingParams(max_tokens=args.gen_len, ignore_eos=True, temperature=0.0)  # the runs' decode share
        llm.generate(prompt_token_ids=prompts.tolist(), sampling_params=sp)
        cal = llm.session.calibrate(hw, save=False)
    finally:
        llm.close()
        shutil.rmtree(store, ignore_errors=True)
    print(f"profile calibrated on a {policy} run first: {cal.name} [{cal.source}]", flush=True)
    return cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="existing checkpoint (default: build a random Mixtral-shaped one)")
    ap.add_argument("--preset", help="write a random checkpoint of this klotski.presets model's shapes "
                                     "(bench/e2e/make_checkpoint.py), truncated to --layers (default: all)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="with --preset: set a config field (JSON value), e.g. hidden_size=256; repeatable")
    ap.add_argument("--gen-device", help="with --preset: where values are drawn (default: cuda if available)")
    ap.add_argument("--shard-size", default="4GB", help="with --preset: safetensors shard size")
    ap.add_argument("--checkpoint-dir", help="with --preset: write the checkpoint here and keep it (a finished "
                                             "one there is reused) instead of a temporary directory")
    add_model_args(ap, layers=None, gpu_memory="32MiB", cpu_memory="16MiB")
    ap.add_argument("--num-prompts", default="group", help="'group' = one batch group of the plan")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--num-batches", default="auto", help="'auto' = the planner's n")
    ap.add_argument("--batch-size", default="auto", help="'auto' = the planner's batch size")
    ap.add_argument("--calibrate", action="store_true",
                    help="held-out check: fit the profile to each policy's run (per-op timings from its trace, "
                         "klotski.runtime.planning.calibrate_from_run), then run the policy again on other prompts "
                         "and compare it with the calibrated prediction (note: every LLM's first run already "
                         "feeds its timings into the cached profile, see klotski.profile_cache)")
    ap.add_argument("--label", default="", help="machine label written into the JSON")
    ap.add_argument("--policies", default="klotski,flexgen,layerwise")
    ap.add_argument("--baseline", choices=("none", "accelerate"), default="none",
                    help="also run HF transformers + accelerate device_map offloading on klotski's prompts (the "
                         "first policy's without klotski); a row with policy 'accelerate' in the table and the "
                         "JSON's rows; needs the bench extra: accelerate==1.15.0")
    ap.add_argument("--quantize", choices=("int4",), help="also run every policy over int4 experts (paired)")
    ap.add_argument("--lookahead", action="store_true",
                    help="also run klotski with prefetch='lookahead' (gate lookahead + table), paired with the "
                         "table-only run: cold loads after the gate, prefetch precision/recall, tokens/s")
    ap.add_argument("--group-size", type=int, default=128, help="--quantize int4: input columns per scale")
    ap.add_argument("--expert-selection", default="", help="comma list, e.g. off,lynx:0.5,lynx-offload:0.5: klotski "
                    "again per setting (paired rows: expert bytes per decode step, tokens/s; bench/e2e/selection_rows.py)")
    ap.add_argument("--host-compute-off", action="store_true",
                    help="klotski once more with host_compute='off' (paired with its default 'auto' row)")
    ap.add_argument("--hardware", default=None, help="hardware preset name or profile JSON every variant plans with "
                    "(default: this machine's measured profile); e.g. rtx3090 to get GPU-resident experts under a "
                    "small budget")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    args = ap.parse_args()
    if args.model and args.preset:
        ap.error("--model and --preset are exclusive")
    if args.layers is None and not args.preset:
        args.layers = 4
    if args.preset:
        mc = load_make_checkpoint()
        args.override = [mc.parse_override(o) for o in args.override]

    from klotski import LLM, SamplingParams
    from klotski.units import format_bytes

    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="klotski-bench-")
    atexit.register(shutil.rmtree, work, True)  # the checkpoint and the stores: removed however the run ends
    model = args.model or args.checkpoint_dir or os.path.join(work, "model")
    made = None
    if args.preset:
        made = preset_checkpoint(model, args)
    elif not args.model:
        build_checkpoint(model, args)
    size = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    what = f"{args.preset} x {args.layers or 'all'} layers, " if args.preset else ""
    print(f"checkpoint {what}{format_bytes(size)} ({args.dtype}), budget gpu {args.gpu_memory} cpu {args.cpu_memory}, "
          f"prompts of {args.prompt_len} tokens, {args.gen_len} generated")
    rows, tokens, runs = [], {}, {}
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor() or "cpu"
    path = os.path.join(args.out, f"e2e-offload-{time.strftime('%Y%m%d-%H%M%S')}.json")

    def save(rows, baseline, same, targets=None):
        with open(path, "w") as f:
            json.dump({"args": vars(args), "label": args.label, "checkpoint_bytes": size, "checkpoint": made,
                       "device": device, "tokens_identical": same, "targets": targets,
                       "rows": rows + ([baseline] if baseline else [])}, f, indent=1)

    variants = [(p, q, "table") for p in args.policies.split(",")
                for q in ([None, args.quantize] if args.quantize else [None])]
    if args.lookahead:  # klotski again with gate-lookahead prefetch, paired with the table-only run
        variants += [(p, q, "lookahead") for p, q, _ in list(variants) if p == "klotski"]
    variants = [(p, q, f, None, "auto") for p, q, f in variants]
    if args.expert_selection:  # klotski once per selection setting (the "off" row is the paired exact run)
        variants += [("klotski", None, "table", s, "auto") for s in args.expert_selection.split(",")]
        selection_rows.count_decode_loads()
    if args.host_compute_off:  # last: a step cut short by its timeout keeps the rows above
        variants.append(("klotski", None, "table", None, "off"))
    from klotski.hardware import get_hardware
    from klotski.runtime.planning import machine_profile

    # one profile for every variant: each LLM's first run would otherwise refit the cached profile and the next
    # variant would plan from other rates (an explicit profile is never changed)
    shared_hw = get_hardware(args.hardware) if args.hardware else machine_profile(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.hardware and not shared_hw.calibrated:
        shared_hw = calibrated_first(model, args, variants[0][0], shared_hw, work)
    for policy, quant, prefetch, selection, host in variants:
        store = os.path.join(work, f"store-{policy}")
        if quant:
            from klotski.store import convert_checkpoint

            convert_checkpoint(model, store, quantize=quant, group_size=args.group_size)
        llm = LLM(model, device=args.device, policy=policy, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                  offload_dir=store, num_batches=args.num_batches, batch_size=args.batch_size, quantization=quant,
                  prefetch=prefetch, hardware=shared_hw, expert_selection=selection or "off",
                  host_compute=host)
        count = llm.session.group_size if args.num_prompts == "group" else int(args.num_prompts)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, llm.spec.vocab_size, (2 * count, args.prompt_len), generator=g).tolist()
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=sp)  # warm-up run (prefetch table)
        plan_hw = llm.session.hardware
        since = len(llm.executor.__dict__.get("bench_forwards", []))
        outs, row = timed_run(llm, prompts[:count], sp, plan_hw)
        if selection is not None:
            row.update(selection_rows.decode_fields(llm.executor, since), expert_selection_setting=selection)
        policy_key = f"{policy}+{quant}" if quant else policy
        if prefetch != "table":
            policy_key += f"@{prefetch}"
        if selection is not None:
            policy_key += f"~{selection}"  # selection changes tokens: not in the cross-policy comparison
        if host != "auto":
            policy_key += f"/host-{host}"  # exact: its tokens are compared with every policy's
        tokens[policy_key] = [o.token_ids for o in outs]
        if not quant and prefetch == "table" and selection is None and host == "auto":
            runs[policy] = {"prompts": prompts[:count], "device": str(llm.executor.device),
                            "dtype": str(llm.executor.dtype).replace("torch.", "")}
        row = {"policy": policy, "quantization": quant, "prefetch": prefetch, "host_compute": host,
               "num_prompts": count, **row}
        if args.calibrate:
            cal = llm.session.calibrate(llm.session.hardware, save=False)  # fitted on the first run ...
            in_sample = llm.session.metrics["predicted_tokens_per_s"]
            outs2, row2 = timed_run(llm, prompts[count:], sp, plan_hw)  # ... predicts a second run on other prompts
            row = {"policy": policy, "quantization": quant, "prefetch": prefetch, "host_compute": host,
                   "num_prompts": count, **row2,
                   "predicted_tokens_per_s_uncalibrated": row["predicted_tokens_per_s"],
                   "first_run": {k: row[k] for k in ("tokens_per_s", "wall_s", "predicted_tokens_per_s")},
                   "predicted_first_run_in_sample": in_sample,
                   "calibrated_profile": {k: v for k, v in cal.to_dict().items() if k != "notes"}}
        rows.append(row)
        llm.close()
        row["disk_read_per_token"] = row["bytes_disk_read"] / max(1, row.get("generated_tokens") or count * args.gen_len)
        shutil.rmtree(store, ignore_errors=True)  # disk: one store at a time
        print(f"{policy_key}: {row['tokens_per_s']:.2f} tokens/s ({count} prompts), {time.perf_counter() - t_start:.0f} s "
              f"since start", flush=True)
        save(rows, None, None)  # so far (tokens compared at the end)
    plain = {k: v for k, v in tokens.items() if "+" not in k and "~" not in k}  # int4 runs compute other weights: compared apart
    quant_tokens = {k: v for k, v in tokens.items() if "+" in k}
    same = all(_same(group) for group in (plain, quant_tokens) if group)
    baseline = None
    if args.baseline == "accelerate":
        baseline = accelerate_row(model, runs, args, tokens, work)
    if args.calibrate:
        print("tok/s: the second run; pred: predicted from the profile calibrated on the first run (held out); "
              "uncal: predicted from the profile the plan was made on")
    offload_report.print_tables(rows, args)
    if baseline is not None:
        offload_report.print_baseline(baseline, rows)
    if args.expert_selection:
        selection_rows.print_selection(rows, format_bytes)
    print(f"greedy tokens identical across policies: {same}")
    targets = offload_report.check_targets(rows, baseline)
    if args.expert_selection:
        targets.update(selection_rows.selection_targets(rows))
    for name, t in targets.items():
        print(f"target {name}: {t['value']:.2f} (want {t['want']}) -> {'met' if t['met'] else 'MISSED'}")
    save(rows, baseline, same, targets)
    print(f"wrote {path}")


def _same(tokens: dict) -> bool:
    n0 = min(len(v) for v in tokens.values())
    first = next(iter(tokens.values()))[:n0]
    return all(v[:n0] == first for v in tokens.values())


if __name__ == "__main__":
    main()
