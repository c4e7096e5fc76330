"""The per-rank body of the 2-process gloo FSE-DP test (spawned by test_fsedp_gloo.py; importable by name)."""
from __future__ import annotations

import os
import random

import torch

SLICES, SLOTS = 3, 2
# routing hooks (the same on every rank and in the reference): topk_ids remapped through a table
REMAP = {"random": None, "skewed": [0, 0, 1, 3], "single_rank": None, "empty": [1, 1, 1, 1]}


def hook(name):
    table = REMAP[name]
    if table is None:
        return None
    table = torch.tensor(table, dtype=torch.int64)

    def remap(topk_weights, topk_ids):
        return topk_weights, table.to(topk_ids.device)[topk_ids]

    return remap


def scenarios(vocab: int, world: int):
    """name -> per-rank (prompts, max_tokens): random prompts; skewed routing and uneven prompt counts; one rank
    with no prompts; all tokens on one expert with ranks stopping at different steps."""
    rng = random.Random(7)
    draw = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    return {
        "random": [([draw(rng.randint(3, 9)) for _ in range(2)], 4) for _ in range(world)],
        "skewed": [([draw(7), draw(4), draw(6)], 4)] + [([draw(5)], 4) for _ in range(world - 1)],
        "single_rank": [([draw(6), draw(3)], 4)] + [([], 4) for _ in range(world - 1)],
        "empty": [([draw(5)], 5)] + [([draw(8), draw(2)], 2) for _ in range(world - 1)],
    }


def run_rank(rank: int, world: int, init_file: str, model_dir: str, out_dir: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from klotski.checkpoint import SafetensorsIndex
    from klotski.distributed.model import DistributedModel
    from klotski.distributed.run import generate_on_rank, logits_on_rank
    from klotski.model import ModelSpec
    from klotski.model.weights import CheckpointWeights
    from klotski.sampling import SamplingParams

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=device if backend == "nccl" else None)
    try:
        spec = ModelSpec.from_pretrained(model_dir)
        weights = CheckpointWeights(SafetensorsIndex(model_dir), spec)
        model = DistributedModel(weights, device, torch.float32, num_slices=SLICES, slots=SLOTS)
        model.streamer.log = []  # record every layer's all-gathered counts
        results = {}
        for name, per_rank in scenarios(spec.vocab_size, world).items():
            model.routing_hook = hook(name)
            model.streamer.loader = "most_tokens" if name == "skewed" else "balanced"  # both loader rules
            prompts, max_tokens = per_rank[rank]
            reads_before = model.streamer.host.reads.copy()
            log_start = len(model.streamer.log)
            sent_before = model.streamer.bytes_sent
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            tokens = generate_on_rank(model, prompts, params, spec.eos_token_ids)
            logits = logits_on_rank(model, prompts)
            results[name] = dict(tokens=tokens, logits=[t.cpu() for t in logits], log=model.streamer.log[log_start:],
                                 reads=dict(model.streamer.host.reads - reads_before),
                                 sent=model.streamer.bytes_sent - sent_before)
        results["metrics"] = model.metrics()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_ranks(world: int, model_dir: str, out_dir, backend: str = "gloo", timeout_s: float = 120) -> list[dict]:
    """Run :func:`run_rank` in ``world`` spawned processes; a rank still running after ``timeout_s`` (a deadlock)
    is killed and fails the caller. -> each rank's results."""
    from multiprocessing import get_context

    ctx = get_context("spawn")
    procs = [ctx.Process(target=run_rank, args=(r, world, os.path.join(out_dir, "pg"), model_dir, str(out_dir),
                                                backend)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s: deadlock or hang"
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
