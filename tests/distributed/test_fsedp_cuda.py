"""FSE-DP on GPUs over NCCL (skipped without them): one GPU as a world of one (slice loads on the side stream,
Triton kernels over one-slot pools), and two GPUs streaming slices between them over NCCL point-to-point."""
import pytest
import torch

import fsedp_worker as worker
from test_fsedp_gloo import check_against_resident

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_one_gpu_world_of_one_matches_resident(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral")
    check_against_resident(model_dir, worker.spawn_ranks(1, model_dir, tmp_path, "nccl", 300), "cuda", atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_nccl_match_resident(checkpoints, tmp_path):
    model_dir, _ = checkpoints.get("mixtral")
    check_against_resident(model_dir, worker.spawn_ranks(2, model_dir, tmp_path, "nccl", 300), "cuda", atol=1e-4)
