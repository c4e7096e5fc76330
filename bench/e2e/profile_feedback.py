"""How the cached hardware profile's feed-back serves a model: a fresh profile cache, optionally first the
demo's runs (a tiny model whose ops are fixed costs), then ``--runs`` LLMs in a row on MODEL, each planning
with what the runs before it fed back, each calling ``generate`` ``--generates`` times on the same prompts (its
first run's feedback re-plans the same LLM when it moved the plan's prediction more than 2x). Per generate:
measured and predicted tokens/s, the plan, whether it was re-planned, and the profile's terms.

    python bench/e2e/profile_feedback.py --model DIR [--after-demo] [--runs 3] [--generates 1] [--policy klotski]
        [--gpu-memory 100MiB --cpu-memory 2GiB --prompts 96 --prompt-len 128 --gen-len 16]

CPU mode (``--device cpu``, the default) measures this machine's CPU as the device. Writes JSON under
bench/results/ (``--out``). Uses its own cache directory (``XDG_CACHE_HOME`` set to a temporary one), so this
machine's cached profile is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TERMS = ("matmul_flops", "attention_flops", "device_mem_bandwidth", "op_overhead_s", "h2d_bandwidth",
         "d2h_bandwidth", "disk_bandwidth", "transfer_latency_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--after-demo", action="store_true", help="run `klotski demo` on the fresh cache first")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--generates", type=int, default=1, help="generate calls per LLM (same prompts)")
    ap.add_argument("--policy", default="klotski")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpu-memory", default="100MiB")
    ap.add_argument("--cpu-memory", default="2GiB")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: its profile and timings are not this machine's")
    cache = tempfile.mkdtemp(prefix="klotski-profile-feedback-")
    os.environ["XDG_CACHE_HOME"] = cache  # before klotski reads its profile cache
    import torch

    from klotski import LLM, SamplingParams
    from klotski.hardware import default_profile_path, load_profile

    if args.after_demo:
        subprocess.run([sys.executable, "-m", "klotski", "demo"], check=True, env=dict(os.environ),
                       stdout=subprocess.DEVNULL)
    profile_path = default_profile_path(args.device)
    sp = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    rows = []

    def terms() -> dict:
        if not profile_path.is_file():
            return {}
        d = load_profile(profile_path).to_dict()
        return {k: d[k] for k in TERMS} | {"source": d["source"]}

    start = terms()
    for i in range(args.runs):
        with LLM(args.model, device=args.device, dtype=args.dtype, policy=args.policy, gpu_memory=args.gpu_memory,
                 cpu_memory=args.cpu_memory, offload_dir=os.path.join(cache, "store")) as llm:
            vocab = llm.spec.vocab_size
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
            last = None
            for k in range(args.generates):
                t0 = time.perf_counter()
                llm.generate(prompt_token_ids=prompts, sampling_params=sp)
                wall = time.perf_counter() - t0
                extra = llm.metrics.extra
                planned = llm.session.run_plan
                measured = args.prompts * args.gen_len / wall
                row = {"run": i, "generate": k, "measured_tokens_per_s": measured,
                       "predicted_tokens_per_s": extra["predicted_tokens_per_s"], "plan": extra["plan"],
                       "profile": extra["hardware_profile"], "replanned": last is not None and planned is not last,
                       "profile_after": terms()}
                last = planned
                rows.append(row)
                print(f"run {i} generate {k}: measured {measured:.1f} tok/s, predicted "
                      f"{row['predicted_tokens_per_s']:.1f} (measured / predicted "
                      f"{measured / row['predicted_tokens_per_s']:.2f}), plan {extra['plan']['batch_size']}x"
                      f"{extra['plan']['n']}{' (re-planned)' if row['replanned'] else ''}; "
                      f"profile after: matmul {max(row['profile_after']['matmul_flops'].values()) / 1e9:.0f} "
                      f"GFLOP/s, overhead {row['profile_after']['op_overhead_s'] * 1e3:.2f} ms/call", flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "results",
                                   time.strftime("%Y%m%d-%H%M%S") + "-profile-feedback.json")
    doc = {"command": "python bench/e2e/profile_feedback.py " + " ".join(sys.argv[1:]), "profile_before": start,
           "rows": rows}
    with open(out + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
