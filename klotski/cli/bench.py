"""``klotski bench``: tokens/s of a model under each policy with synthetic prompts; table + JSON.

    klotski bench --model DIR --policy klotski,flexgen,layerwise --gpu-memory 24GiB --prompt-len 512 --gen-len 32
"""
from __future__ import annotations

import json
import platform
import subprocess

from klotski.cli.compare import calibrate_first, compare_policies
from klotski.cli.metrics_table import format_table
from klotski.cli.options import add_engine_args


def add_parser(sub):
    p = sub.add_parser("bench", help="measure generation throughput per policy (synthetic prompts)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="fit this machine's hardware profile to the per-op timings of the first offloaded "
                        "policy's run and save it; later plans (and their predictions) use it (a profile no "
                        "run has calibrated is first fitted on one run of the workload in any case)")
    add_engine_args(p, policy_default="klotski,flexgen,layerwise")
    return p


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(args) -> int:
    import torch

    from klotski.demo import ensure_demo_checkpoint
    from klotski.model import ModelSpec

    model = args.model or ensure_demo_checkpoint()
    spec = ModelSpec.from_pretrained(model)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, spec.vocab_size, (args.num_prompts, args.prompt_len), generator=g).tolist()
    policies = tuple(p.strip() for p in args.policy.split(",") if p.strip())
    calibrated = []

    def calibrate(llm, policy):
        session = llm.session
        if not args.calibrate or calibrated or not session.can_trace:
            return
        from klotski.profile_cache import interpreter_on
        from klotski.runtime.planning import profile_path

        before = session.metrics["predicted_tokens_per_s"]
        session.calibrate()
        after = session.metrics["predicted_tokens_per_s"]
        calibrated.append(policy)
        saved = "not cached (Triton interpreter on)" if interpreter_on() else f"saved {profile_path(llm.device.type)}"
        print(f"calibrated on the {policy} run ({len(session.executor.tracer.observations())} ops): predicted "
              f"{before:.1f} -> {after:.1f} tokens/s; {saved}", flush=True)

    calibrate_first(args, model, policies, prompt_token_ids=prompts, max_tokens=args.gen_len)
    rows, raw, agree = compare_policies(args, model, policies, prompt_token_ids=prompts, max_tokens=args.gen_len,
                                        after_run=calibrate)
    print(format_table(rows))
    print("greedy tokens identical across policies" if agree else "error: policies disagree on the greedy tokens")
    if args.json:
        result = {"command": "klotski bench", "model": model, "commit": git_commit(), "host": platform.node(),
                  "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                  "gpu_memory": args.gpu_memory, "cpu_memory": args.cpu_memory, "results": raw,
                  "tokens_agree": agree}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if agree else 1
