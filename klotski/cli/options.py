"""Options shared by the verbs that build an ``LLM`` (engine, offloading budgets, sampling, traces)."""
from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser, policy_default: str = "resident", traces: bool = True) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--policy", default=policy_default,
                   help="resident, klotski, flexgen or layerwise (default: %(default)s)")
    p.add_argument("--gpu-memory", default=None, help="device budget for offloaded policies, e.g. 24GiB")
    p.add_argument("--cpu-memory", default=None, help="pinned host memory budget, e.g. 64GiB")
    p.add_argument("--offload-dir", default=None, help="disk tier: where the packed expert store lives")
    p.add_argument("--rebuild-store", action="store_true",
                   help="replace a store of another checkpoint found in --offload-dir (refused otherwise)")
    p.add_argument("--num-batches", default="auto", help="batches per batch group (n), or auto")
    p.add_argument("--batch-size", default="auto", help="sequences per batch, or auto")
    add_expert_selection_arg(p)
    p.add_argument("--host-compute", default="auto", metavar="auto|off|prefill=..,decode=..,experts=..",
                   help="offloaded policies: compute on the host too; auto (default: the planner places attention "
                        "per phase and cold experts on a GPU machine), off, or fixed settings, e.g. "
                        "decode=cpu,experts=auto (attention gpu|cpu; experts off|auto|all)")
    if not traces:
        return
    p.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace of the streams")
    p.add_argument("--timeline", default=None, metavar="FILE.png", help="write a compute-vs-I/O timeline picture")


def add_expert_selection_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-selection", default="off", metavar="off|lynx:A|lynx-offload:A",
                   help="decode-step expert selection with aggressiveness A in [0, 1] (default: off, exact routing)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    from klotski.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)


def build_llm(args, model_dir: str, policy: str | None = None):
    from klotski.engine import LLM

    policy = policy or args.policy
    kwargs = {}
    if policy != "resident":
        kwargs = dict(gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, offload_dir=args.offload_dir,
                      num_batches=args.num_batches, batch_size=args.batch_size, rebuild_store=args.rebuild_store,
                      host_compute=getattr(args, "host_compute", "auto"))
    if getattr(args, "max_num_seqs", None) is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return LLM(model_dir, device=args.device, dtype=args.dtype, policy=policy,
               expert_selection=getattr(args, "expert_selection", "off"), **kwargs)


def write_traces(llm, args, suffix: str = "") -> None:
    """Write --trace / --timeline for an offloaded run (``suffix`` tells policies apart)."""
    for path, method in ((args.trace, "write_trace"), (args.timeline, "write_timeline")):
        if not path:
            continue
        if not llm.session.can_trace:
            print(f"({method.replace('write_', '')} skipped: policy {llm.policy} runs no streams)")
            continue
        if suffix:
            root, ext = path.rsplit(".", 1) if "." in path else (path, "")
            path = f"{root}-{suffix}.{ext}" if ext else f"{root}-{suffix}"
        getattr(llm.session, method)(path)
        print(f"wrote {path}")
