"""What one device shows of FSE-DP: one MoE layer's routed experts streamed as slices, with the host-to-device
loads on their own lane (a side CUDA stream) against the same loads serialized with the compute, plus the loads
alone and the computes alone. On CPU both modes are the same memcpy + compute (no overlap is possible there):
run it on a GPU for the figure.

    python bench/e2e/make_checkpoint.py mixtral-8x7b /data/mixtral-2l --layers 2
    python bench/distributed/bench_slice_overlap.py --model /data/mixtral-2l --tokens 64 [--slices 4 --slots 4]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist

from results import command_line, write_json
from klotski.checkpoint import SafetensorsIndex
from klotski.distributed.model import DistributedModel
from klotski.engine import resolve_device, resolve_dtype
from klotski.model import ModelSpec
from klotski.model.weights import CheckpointWeights


def timed(fn, device, reps: int) -> float:
    """Best of ``reps`` wall times of fn() (device synchronised)."""
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. from bench/e2e/make_checkpoint.py)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                    time.strftime("%Y%m%d") + "-fsedp-slice-overlap.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    spec = ModelSpec.from_pretrained(args.model)
    dtype = resolve_dtype(args.dtype, spec, device)
    layer = next(i for i in range(spec.num_layers) if spec.is_moe(i))
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/pg", rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        try:
            model = DistributedModel(CheckpointWeights(SafetensorsIndex(args.model), spec), device, dtype,
                                     num_slices=args.slices, slots=args.slots)
            streamer, host = model.streamer, model.streamer.host
            g = torch.Generator(device="cpu").manual_seed(0)
            h = torch.randn(args.tokens, spec.hidden_size, generator=g).to(device, dtype)
            ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[: spec.top_k]
                               for _ in range(args.tokens)]).to(device)
            weights = torch.full(ids.shape, 1.0 / spec.top_k, device=device)
            side_stream = streamer.load_stream
            overlapped = timed(lambda: streamer.run_layer(layer, h, weights, ids), device, args.reps)
            streamer.load_stream = None  # loads on the compute stream: serialized with the computes
            serial = timed(lambda: streamer.run_layer(layer, h, weights, ids), device, args.reps)
            streamer.load_stream = side_stream
            needed = sorted(set(ids.reshape(-1).tolist()))
            buf = streamer.pool.buffers[0]

            def loads_only():
                for e in needed:
                    for s in range(host.num_slices):
                        host.load(layer, e, s, buf)

            loads = timed(loads_only, device, args.reps)
            from klotski.distributed.schedule import SliceTask

            def computes_only():  # every slice computed from one resident slot (no loads)
                for e in needed:
                    for s in range(host.num_slices):
                        streamer._compute(SliceTask(e, s, (0,), 0), 0, h, weights, ids,
                                          torch.zeros(args.tokens, spec.hidden_size, device=device))

            computes = timed(computes_only, device, args.reps)
        finally:
            dist.destroy_process_group()
    nbytes = len(needed) * host.num_slices * host.slices[layer][0][0].numel() * host.slices[layer][0][0].element_size()
    print(f"{spec.model_type}, layer {layer}, {args.tokens} tokens top-{spec.top_k}: {len(needed)} experts x "
          f"{args.slices} slices = {nbytes / 2**20:.1f} MiB on {device} ({dtype})")
    print(f"{'loads only':>22} {loads * 1e3:>9.2f} ms   ({nbytes / loads / 1e9:.1f} GB/s)")
    print(f"{'computes only':>22} {computes * 1e3:>9.2f} ms")
    print(f"{'serialized':>22} {serial * 1e3:>9.2f} ms")
    print(f"{'load lane overlapped':>22} {overlapped * 1e3:>9.2f} ms   (ideal max(loads, computes) = "
          f"{max(loads, computes) * 1e3:.2f} ms)")
    result = dict(command=command_line("bench_slice_overlap.py", args), device=str(device),
        dtype=str(dtype), experts=len(needed), bytes=nbytes, loads_s=loads, computes_s=computes,
        serialized_s=serial, overlapped_s=overlapped)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
