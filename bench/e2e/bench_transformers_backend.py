"""transformers + accelerate ``device_map`` offloading vs transformers + Klotski's offloaded experts.

    pip install -e ".[bench]"     # accelerate==1.15.0
    python bench/e2e/bench_transformers_backend.py --layers 4 --hidden 512 --inter 1024 \\
        --gpu-memory 64MiB --cpu-memory 48MiB --num-prompts 4 --prompt-len 32 --gen-len 16

One random-weight checkpoint (Mixtral shapes from ``bench/e2e/make_checkpoint.py``, or ``--model DIR``) larger
than the two budgets together; the same token-id prompts, greedy ``model.generate`` (left-padded batch,
attention mask, EOS ignored), timed after a one-token warm-up, on both sides:

* **accelerate**: ``from_pretrained(device_map="auto", max_memory=..., offload_folder=...)``. On CUDA
  ``max_memory={0: gpu_memory, "cpu": cpu_memory}``; on a CPU-only machine the CPU is the execution device,
  so ``max_memory={"cpu": gpu_memory + cpu_memory}``; what does not fit goes to "disk". Every experts module
  under an offloading hook loads all E experts of its layer in every forward: counted per call (forward
  pre-hooks) as that module's expert bytes.
* **klotski**: :func:`klotski.integrations.transformers.load_model` with the non-expert weights on the execution
  device (their bytes are taken off ``gpu_memory``), ``gpu_memory`` minus those for the device expert slots,
  ``cpu_memory`` for host experts and the staging ring, the rest read from the checkpoint on disk when routed.
  Bytes moved: every load into a device slot (host copies, disk reads, prefetches), counted by the modules.

Reported per side: expert bytes moved per generated token and per forward pass, tokens/s, and whether the
greedy tokens are identical; the target check: Klotski's expert bytes per token <= (distinct routed experts
per layer-step / E) x accelerate's, and Klotski faster end to end. Table on stdout, JSON in ``--out``.
On CPU, both read through the page cache (a checkpoint that fits free RAM is served from memory after the
first pass, for both sides alike) and the "device" is host memory: these are CPU figures, not GPU ones.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    """A sibling bench script as a module (bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_model(path: str, args) -> None:
    mc = _load("make_checkpoint")
    overrides = dict(hidden_size=args.hidden, intermediate_size=args.inter, vocab_size=args.vocab,
                     num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
                     num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    mc.make_checkpoint(path, "mixtral-8x7b", layers=args.layers, dtype=args.dtype, device="cpu",
                       shard_size="256MB", seed=0, overrides=overrides, log=lambda *a, **k: None)


def prompts_for(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [max(1, args.prompt_len - 3 * i) for i in range(args.num_prompts)]  # different lengths: padding
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def generate(model, prompts, gen_len: int) -> tuple[list[list[int]], float]:
    ab = sys.modules.get("accelerate_baseline") or _load("accelerate_baseline")
    ids, mask = ab.left_pad_batch(prompts, pad_token_id=0)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids, mask = ids.to(device), mask.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    sync()
    return out[:, ids.shape[1]:].tolist(), time.perf_counter() - t0


def warm_up(model, prompts) -> None:
    generate(model, prompts[:1], 1)


def run_accelerate(ckpt: str, prompts, args, cuda: bool, work: str) -> dict:
    import transformers as tf
    from accelerate.hooks import AlignDevicesHook

    from klotski.integrations.transformers import experts_modules
    from klotski.units import parse_bytes

    g, c = parse_bytes(args.gpu_memory), parse_bytes(args.cpu_memory)
    max_memory = {0: g, "cpu": c} if cuda else {"cpu": g + c}
    t0 = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory=max_memory,
                                                    offload_folder=os.path.join(work, "accelerate"),
                                                    dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - t0
    moved = {"bytes": 0, "calls": 0}

    def counter(nbytes):
        def hook(module, args_):
            moved["bytes"] += nbytes
            moved["calls"] += 1
        return hook

    offloaded = 0
    for _, _, module in experts_modules(model):
        hooks = getattr(getattr(module, "_hf_hook", None), "hooks", None) or [getattr(module, "_hf_hook", None)]
        layer_bytes = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        expert_nbytes = layer_bytes // module.num_experts  # the same in every layer
        if any(isinstance(h, AlignDevicesHook) and h.offload for h in hooks):  # loads all E experts per call
            offloaded += 1
            module.register_forward_pre_hook(counter(layer_bytes))
        else:
            module.register_forward_pre_hook(counter(0))
    warm_up(model, prompts)
    moved.update(bytes=0, calls=0)
    tokens, seconds = generate(model, prompts, args.gen_len)
    device_map = dict(getattr(model, "hf_device_map", {}) or {})
    del model
    return dict(side="accelerate", tokens=tokens, seconds=seconds, load_s=load_s, expert_bytes=moved["bytes"],
                experts_moved_per_layer_forward=moved["bytes"] / expert_nbytes / max(1, moved["calls"]),
                experts_modules_offloaded=offloaded, device_map={k: str(v) for k, v in device_map.items()})


def run_klotski(ckpt: str, prompts, args, cuda: bool) -> dict:
    import transformers as tf

    from klotski.integrations.transformers import load_model
    from klotski.units import parse_bytes

    device = "cuda:0" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    # the non-expert weights stay on the execution device: their bytes come off the device budget
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(ckpt))
    itemsize = torch.empty((), dtype=dtype).element_size()
    non_expert = sum(p.numel() * itemsize for n, p in meta.named_parameters()
                     if not n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    del meta
    gpu = parse_bytes(args.gpu_memory) - non_expert
    if gpu <= 0:
        raise SystemExit(f"--gpu-memory {args.gpu_memory} does not hold the {non_expert} bytes of non-expert weights")
    t0 = time.perf_counter()
    model = load_model(ckpt, gpu_memory=gpu, cpu_memory=args.cpu_memory, device_map={"": device}, dtype=dtype,
                       prefetch=not args.no_prefetch).eval()
    load_s = time.perf_counter() - t0
    group = model.klotski_group
    try:
        warm_up(model, prompts)
        group.reset_stats()
        tokens, seconds = generate(model, prompts, args.gen_len)
        stats = group.stats()
        mods = group.modules
        tiers = dict(device_slots_per_layer=mods[0].num_slots, host_experts_per_layer=len(mods[0].host),
                     num_experts=mods[0].num_experts, non_expert_bytes=non_expert, expert_gpu_budget=gpu,
                     gpu_peak=group.gpu.peak, cpu_peak=group.cpu.peak)
    finally:
        group.close()
    moved = stats["host_bytes"] + stats["disk_bytes"] + stats["prefetch_bytes"]
    return dict(side="klotski", tokens=tokens, seconds=seconds, load_s=load_s, expert_bytes=moved, stats=stats,
                experts_moved_per_layer_forward=(stats["loads"] + stats["prefetch_loads"]) / max(1, stats["forwards"]),
                tiers=tiers)


def summarize(r: dict, args) -> dict:
    generated = args.num_prompts * args.gen_len
    return dict(r, generated_tokens=generated, tokens_per_s=generated / r["seconds"],
                expert_bytes_per_token=r["expert_bytes"] / generated,
                expert_bytes_per_forward=r["expert_bytes"] / args.gen_len)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="existing checkpoint (default: a random Mixtral-shaped one, built once)")
    ap.add_argument("--checkpoint-dir", help="where the random checkpoint is built / reused")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--gpu-memory", default="64MiB")
    ap.add_argument("--cpu-memory", default="48MiB")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="paired runs (klotski, accelerate) per invocation")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--label", default="", help="machine label written into the JSON")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (one file per budget point)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results"))
    args = ap.parse_args(argv)
    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("accelerate is not installed: pip install -e '.[bench]' (accelerate==1.15.0)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    work = tempfile.mkdtemp(prefix="klotski-tfb-")
    ckpt = args.model or args.checkpoint_dir or os.path.join(work, "model")
    if not args.model and not os.path.isfile(os.path.join(ckpt, "config.json")):
        make_model(ckpt, args)
    from klotski.units import format_bytes

    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = prompts_for(args, vocab)
    runs = {"klotski": [], "accelerate": []}
    try:
        for _ in range(args.repeats):
            runs["klotski"].append(summarize(run_klotski(ckpt, prompts, args, cuda), args))
            runs["accelerate"].append(summarize(run_accelerate(ckpt, prompts, args, cuda, work), args))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the random checkpoint (unless --checkpoint-dir) and accelerate's
    k, a = runs["klotski"][-1], runs["accelerate"][-1]
    med = {side: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "expert_bytes_per_token")}
           for side, rs in runs.items()}
    st = k["stats"]
    distinct = st["routed"] / st["forwards"]  # distinct routed experts per layer and forward pass
    E = k["tiers"]["num_experts"]
    bytes_ratio = med["klotski"]["expert_bytes_per_token"] / max(1.0, med["accelerate"]["expert_bytes_per_token"])
    speedup = med["klotski"]["tokens_per_s"] / med["accelerate"]["tokens_per_s"]
    same = all(r["tokens"] == runs["accelerate"][0]["tokens"] for r in runs["klotski"] + runs["accelerate"])
    targets = dict(distinct_routed_per_step=distinct, num_experts=E, bytes_ratio=bytes_ratio,
                   bytes_target=distinct / E, bytes_target_met=bytes_ratio <= distinct / E,
                   speedup=speedup, faster=speedup > 1.0, greedy_tokens_identical=same)
    print(f"checkpoint {ckpt}: {format_bytes(ckpt_bytes)} of safetensors; budgets gpu {args.gpu_memory}, "
          f"cpu {args.cpu_memory}; {'cuda' if cuda else 'cpu'}; {args.num_prompts} prompts x {args.gen_len} tokens")
    print(f"klotski tiers: {k['tiers']}; accelerate device map tiers: "
          f"{sorted(set(a['device_map'].values()))}, {a['experts_modules_offloaded']} experts modules offloaded")
    print(f"{'side':<11} {'tok/s':>8} {'expert MiB/token':>17} {'expert MiB/forward':>19} "
          f"{'experts moved/layer-fwd':>24} {'load s':>7}")
    for side in ("accelerate", "klotski"):
        for r in runs[side]:
            print(f"{side:<11} {r['tokens_per_s']:8.2f} {r['expert_bytes_per_token'] / 2**20:17.3f} "
                  f"{r['expert_bytes_per_forward'] / 2**20:19.3f} {r['experts_moved_per_layer_forward']:24.2f} "
                  f"{r['load_s']:7.2f}")
    print(f"klotski/accelerate expert bytes {bytes_ratio:.3f} (target <= distinct/E = {distinct:.2f}/{E} = "
          f"{distinct / E:.3f}: {'met' if targets['bytes_target_met'] else 'NOT met'}); speed-up {speedup:.2f}x "
          f"({'faster' if targets['faster'] else 'NOT faster'}); greedy tokens identical: {same}")
    result = dict(bench="transformers_backend", label=args.label, machine=platform.node(), cuda=cuda,
                  args=vars(args), checkpoint=ckpt, checkpoint_bytes=ckpt_bytes, prompts=prompts,
                  runs={s: [{key: v for key, v in r.items() if key != "tokens"} for r in rs] for s, rs in runs.items()},
                  tokens={s: rs[0]["tokens"] for s, rs in runs.items()}, medians=med, targets=targets,
                  command="python bench/e2e/bench_transformers_backend.py " + shlex.join(argv or sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = os.path.join(args.out, f"transformers_backend_{'cuda' if cuda else 'cpu'}{tag}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
