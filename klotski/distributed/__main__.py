"""``torchrun --nproc-per-node N -m klotski.distributed --model DIR --prompt TEXT ...``: FSE-DP generation.

Every rank loads the dense weights (resident on its device) and the routed experts as host-memory slices, takes
every N-th prompt (data parallel), generates greedily or by sampling, and streams the routed experts across the
ranks (:mod:`klotski.distributed.model`). Rank 0 prints every prompt's output in order, then the per-rank host
and device-to-device bytes. Backend: NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is available and
``--device`` is not ``cpu``; gloo on CPU otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun ... -m klotski.distributed",
                                description="Fully sharded expert streaming (FSE-DP) over torch.distributed.")
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="seeds every request (default: unseeded)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--slices", type=int, default=4, help="slices per expert along its intermediate dimension")
    p.add_argument("--slots", type=int, default=2, help="slice buffers per rank (>= 1)")
    p.add_argument("--loader", default="balanced", choices=("balanced", "most_tokens"),
                   help="which rank loads each slice from host: spread host-link bytes, or the rank with most tokens")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="rank 0 writes the outputs and per-rank metrics here")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective or point-to-point operation may wait for the other ranks (a rank "
                        "that failed) before this one gives up")
    return p


def _init(device_arg: str, timeout_s: float):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("klotski.distributed: RANK / WORLD_SIZE are not set: launch it with "
                         "torchrun --nproc-per-node N -m klotski.distributed ...")
    use_cuda = device_arg != "cpu" and torch.cuda.is_available()
    if device_arg == "cuda" and not use_cuda:
        raise SystemExit("klotski.distributed: --device cuda was requested but torch sees no CUDA device")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # eager initialisation: point-to-point operations share the communicator
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise SystemExit(f"klotski.distributed: --max-tokens must be >= 1, got {args.max_tokens}")
    if args.timeout <= 0:
        raise SystemExit(f"klotski.distributed: --timeout must be > 0, got {args.timeout}")
    device = _init(args.device, args.timeout)
    import torch.distributed as dist

    from klotski.checkpoint import SafetensorsIndex
    from klotski.distributed.model import DistributedModel
    from klotski.distributed.run import gather_in_order, generate_on_rank, split_prompts
    from klotski.engine import resolve_dtype
    from klotski.model import ModelSpec
    from klotski.model.weights import CheckpointWeights
    from klotski.sampling import SamplingParams
    from klotski.tokenizer import Tokenizer

    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        spec = ModelSpec.from_pretrained(args.model)
        dtype = resolve_dtype(args.dtype, spec, device)
        weights = CheckpointWeights(SafetensorsIndex(args.model), spec)
        tokenizer = Tokenizer(args.model)
        model = DistributedModel(weights, device, dtype, num_slices=args.slices, slots=args.slots,
                                 loader=args.loader)
        encoded = [tokenizer.encode(p) for p in args.prompt]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"--prompt {i} ({args.prompt[i]!r}) has no tokens")
        mine = split_prompts(encoded, rank, world)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                                top_p=args.top_p, top_k=args.top_k, ignore_eos=args.ignore_eos)
        start = time.perf_counter()
        tokens = generate_on_rank(model, mine, params, spec.eos_token_ids, seed=(args.seed or 0) + rank)
        elapsed = time.perf_counter() - start
        outputs = gather_in_order(tokens, rank, world)
        metrics: list = [None] * world
        dist.all_gather_object(metrics, {**model.metrics(), "seconds": elapsed, "rank": rank})
        if rank == 0:
            for prompt, out in zip(args.prompt, outputs):
                print(f"--- prompt: {prompt!r}")
                print(f"    output: {tokenizer.decode(out)!r}")
                print(f"    tokens: {out}")
            for m in metrics:
                print(f"rank {m['rank']}: host bytes {m['host_bytes']} (replicated offloading: "
                      f"{m['replicated_host_bytes']}), d2d sent {m['d2d_bytes_sent']}, "
                      f"received {m['d2d_bytes_received']}, peak slots {m['peak_slots']}/{m['slots']}, "
                      f"{m['forwards']} forwards, {m['seconds']:.2f} s")
            if args.json:
                with open(args.json + ".tmp", "w") as f:
                    json.dump({"world_size": world, "device": str(device), "outputs": outputs,
                               "ranks": metrics}, f, indent=2)
                os.replace(args.json + ".tmp", args.json)
    finally:
        dist.destroy_process_group()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input (a missing model, an empty prompt, bad settings) reported in one line."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"klotski.distributed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
