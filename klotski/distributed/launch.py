"""``klotski generate --nproc N``: the same generation as ``torchrun --nproc-per-node N -m klotski.distributed``,
launched for the user (one machine, N local ranks)."""
from __future__ import annotations

import subprocess
import sys


def torchrun_command(args) -> list[str]:
    """The torchrun command line for ``klotski generate`` options ``args`` (``args.nproc`` > 1); raises
    ValueError for options FSE-DP does not run with."""
    if args.policy != "resident":
        raise ValueError(f"--nproc {args.nproc}: --policy {args.policy} is a single-device policy; with several "
                         f"ranks the routed experts stream between them (FSE-DP) and everything else is resident")
    unsupported = [name for name, value, default in (
        ("--gpu-memory", args.gpu_memory, None), ("--cpu-memory", args.cpu_memory, None),
        ("--offload-dir", args.offload_dir, None), ("--expert-selection", args.expert_selection, "off"),
        ("--trace", getattr(args, "trace", None), None), ("--timeline", getattr(args, "timeline", None), None))
        if value != default]
    if unsupported:
        raise ValueError(f"--nproc {args.nproc} does not support {', '.join(unsupported)} yet")
    device = args.device if args.device in ("auto", "cpu", "cuda") else "cuda"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "klotski.distributed", "--model", args.model, "--max-tokens", str(args.max_tokens),
           "--temperature", str(args.temperature), "--top-p", str(args.top_p), "--top-k", str(args.top_k),
           "--dtype", args.dtype, "--device", device]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    for prompt in args.prompt:
        cmd += ["--prompt", prompt]
    return cmd


def run_nproc(args) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    return subprocess.run(torchrun_command(args)).returncode
