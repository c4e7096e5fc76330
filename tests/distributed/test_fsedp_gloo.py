"""FSE-DP over 2 gloo processes on CPU equals a single-process resident run, reads each slice once, and never
deadlocks with 2 slots per rank (a hang fails the test at its timeout)."""
import os
from multiprocessing import get_context

import pytest
import torch

import fsedp_worker as worker

WORLD, TIMEOUT_S = 2, 120


def reference(model_dir, name, per_rank):
    """A single-process resident run of each rank's batch of prompts (the same hooked routing)."""
    from klotski.checkpoint import SafetensorsIndex
    from klotski.generation import generate_batch, left_pad
    from klotski.model import ModelSpec
    from klotski.model.resident import ResidentModel
    from klotski.model.weights import CheckpointWeights
    from klotski.sampling import SamplingParams
    from klotski.triton_kernels.fused_moe import fused_moe_torch

    remap = worker.hook(name)

    def experts_fn(h, w13, w2, topk_weights, topk_ids, **kw):
        if remap is not None:
            topk_weights, topk_ids = remap(topk_weights, topk_ids)
        return fused_moe_torch(h, w13, w2, topk_weights, topk_ids, **kw)

    spec = ModelSpec.from_pretrained(model_dir)
    model = ResidentModel(CheckpointWeights(SafetensorsIndex(model_dir), spec), torch.device("cpu"), torch.float32,
                          experts_fn=experts_fn)
    out = []
    for prompts, max_tokens in per_rank:
        if not prompts:
            out.append(([], []))
            continue
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        tokens = generate_batch(model, prompts, [params] * len(prompts), spec.eos_token_ids, torch.Generator())
        batch, pad = left_pad(prompts)
        logits = model.forward(batch, model.new_cache(len(prompts), batch.shape[1], pad), all_logits=True)
        out.append((tokens, [logits[i, int(pad[i]):] for i in range(len(prompts))]))
    return out


def test_two_ranks_match_resident(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral")
    ctx = get_context("spawn")
    procs = [ctx.Process(target=worker.run_rank, args=(r, WORLD, str(tmp_path / "pg"), model_dir, str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s: deadlock or hang"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    from klotski.model import ModelSpec

    spec = ModelSpec.from_pretrained(model_dir)
    for name, per_rank in worker.scenarios(spec.vocab_size, WORLD).items():
        ref = reference(model_dir, name, per_rank)
        for r in range(WORLD):
            got = res[r][name]
            assert got["tokens"] == ref[r][0], (name, r)
            assert len(got["logits"]) == len(ref[r][1])
            for a, b in zip(got["logits"], ref[r][1]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        # every rank ran the same MoE layers on the same all-gathered counts
        log = res[0][name]["log"]
        assert all(res[r][name]["log"] == log for r in range(WORLD))
        # each slice read from host once per layer run in which any rank routed a token to its expert
        expected = {}
        for layer, counts in log:
            for e in range(spec.num_experts):
                if any(counts[r][e] for r in range(WORLD)):
                    for s in range(worker.SLICES):
                        expected[(layer, e, s)] = expected.get((layer, e, s), 0) + 1
        reads = {}
        for r in range(WORLD):
            for key, n in res[r][name]["reads"].items():
                reads[key] = reads.get(key, 0) + n
        assert reads == expected, name
        if name == "empty":  # all routed to expert 1: nothing else is ever read
            assert {e for _, e, _ in reads} == {1}
        if name == "single_rank":  # rank 1 holds no tokens: it loads and forwards nothing
            assert not res[1][name]["reads"] and res[0][name]["sent"] == 0
    assert sum(res[r]["random"]["sent"] for r in range(WORLD)) > 0  # slices did travel between ranks
    for r in range(WORLD):
        assert res[r]["metrics"]["peak_slots"] <= worker.SLOTS
