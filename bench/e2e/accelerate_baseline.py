"""The baseline users know: HF transformers + accelerate big-model inference (``device_map="auto"``).

    pip install -e ".[bench]"        # accelerate==1.15.0
    python bench/e2e/accelerate_baseline.py --model CKPT --gpu-memory 24GB --cpu-memory 64GB --gen-len 32

``run_accelerate`` loads the checkpoint with ``AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto",
max_memory=..., offload_folder=..., dtype=...)``: accelerate fills the accelerator up to its budget, then CPU
memory, then puts the remaining modules on "disk" (safetensors files it reads back in every forward pass), and
hooks every offloaded module so that its weights are loaded right before it runs and dropped after. Then
greedy ``generate`` on a left-padded batch of token-id prompts (attention mask; EOS ignored, exactly
``gen_len`` new tokens per prompt), timed after one warm-up call (one token for the first prompt: one forward
pass, which runs every hook and reads every offloaded weight once). All prompts run as one batch, as a user
of ``generate`` would run them; ``max_memory`` bounds where accelerate puts *weights*, not the activations and
KV cache of that batch, so the measured peak can exceed the budget.

Budgets:
- CUDA: ``max_memory={0: gpu_memory, "cpu": cpu_memory}``; the rest goes to disk.
- CPU-only machine: the CPU is the execution device, so ``max_memory={"cpu": gpu_memory + cpu_memory}`` (the
  RAM that klotski's CPU mode may use for its device pool plus its host tier); what does not fit goes to disk.
  This really offloads: modules on "disk" in ``hf_device_map`` are meta tensors in the model, read from
  ``offload_folder`` (or from the checkpoint's own safetensors when no conversion was needed) by accelerate's
  hooks in every forward pass. Modules on "cpu" stay resident. Two things to know when reading the numbers:
  accelerate keeps room on the execution device for the largest offloaded layer, so a budget below one
  decoder layer sends *everything* to disk (``hf_device_map == {"": "disk"}``); and the reads go through the
  page cache, so a checkpoint that fits in free RAM is served from memory after the warm-up, as for klotski's
  buffered reads.

Memory reported: on CUDA ``torch.cuda.max_memory_allocated`` over the timed call (weights resident on the GPU
included). Everywhere, the growth of the process's peak RSS over the timed call (``VmHWM`` reset through
``/proc/self/clear_refs`` just before the call, minus ``VmRSS`` before it): activations, KV cache and weights
loaded by the hooks, *not* the resident "cpu" weights loaded before the call; it includes file pages of the
mmapped safetensors that the hooks touch.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AccelerateResult:
    tokens_per_s: float            # generated tokens / wall_s
    wall_s: float                  # wall time of the timed generate call
    load_s: float                  # from_pretrained (device map, offload files written)
    generated_tokens: int
    token_ids: list[list[int]]     # [num_prompts][gen_len] greedy tokens
    device: str
    dtype: str
    max_memory: dict               # what was passed to from_pretrained, bytes
    device_map: dict               # model.hf_device_map (module -> 0 / "cpu" / "disk")
    tiers: dict                    # tier -> {"modules": n, "bytes": parameter bytes placed there}
    forward_calls: int             # model forward passes in the timed call (prefill + decode steps)
    bytes_disk_read: int           # disk-tier bytes as stored x forward calls: what the hooks read from disk
    bytes_h2d: int                 # CUDA: (cpu + disk tier parameter bytes) x forward calls; 0 on CPU
    storage_read_bytes: int        # /proc/self/io read_bytes delta: bytes really fetched from storage
    peak_gpu_bytes: int | None     # torch.cuda.max_memory_allocated over the timed call (CUDA only)
    peak_rss_growth_bytes: int | None  # peak RSS during the call minus RSS before it (Linux), see module doc

    def to_dict(self) -> dict:
        return asdict(self)


def _proc_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _storage_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def left_pad_batch(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> (input_ids [B, S_max], attention_mask [B, S_max]), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"every prompt needs at least one token, got lengths {[len(p) for p in prompts]}")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def tier_summary(model: torch.nn.Module, device_map: dict) -> dict:
    """Tier -> {"modules": entries of the device map there, "bytes": parameter bytes placed there}.

    Offloaded parameters are meta tensors, which still carry shape and dtype. Tiers are "gpu" (any device
    index), "cpu" and "disk"."""
    def tier(d) -> str:
        return "gpu" if isinstance(d, int) or str(d).startswith("cuda") else str(d)

    keys = sorted(device_map, key=len, reverse=True)  # longest prefix wins

    def where(name: str) -> str:
        for k in keys:
            if k == "" or name == k or name.startswith(k + "."):
                return tier(device_map[k])
        raise ValueError(f"tensor {name} is in no entry of the device map {device_map}")

    out = {t: {"modules": n, "bytes": 0} for t, n in Counter(tier(d) for d in device_map.values()).items()}
    seen = set()
    for name, t in model.named_parameters():
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        out[where(name)]["bytes"] += t.numel() * t.element_size()
    return out


def _safetensors_sizes(path: str) -> dict[str, int]:
    """Tensor name -> bytes stored, from a safetensors file's header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def disk_bytes_per_forward(model: torch.nn.Module) -> int:
    """Bytes accelerate's hooks read from disk in one forward pass of the model: every tensor in the offload
    index (the disk tier), as stored (a tensor read from the checkpoint's own file keeps the checkpoint's
    dtype; one accelerate re-saved into the offload folder has the compute dtype)."""
    from accelerate.hooks import AlignDevicesHook

    index = {}
    for mod in model.modules():
        hook = getattr(mod, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook])  # SequentialHook wraps several
        for h in hooks:
            if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
                loader = getattr(h.weights_map, "dataset", h.weights_map)  # PrefixedDataset -> loader
                index.update(getattr(loader, "index", {}) or {})
    headers, total = {}, 0
    for name, info in index.items():
        if "safetensors_file" in info:
            file = info["safetensors_file"]
            if file not in headers:
                headers[file] = _safetensors_sizes(file)
            total += headers[file][info.get("weight_name", name)]
        else:  # a raw .dat memmap: shape and dtype are in the index
            numel = 1
            for d in info["shape"]:
                numel *= d
            total += numel * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()
    return total


def run_accelerate(model_dir: str, prompts: list[list[int]], gen_len: int, device: str = "auto",
                   gpu_memory: int | str = "24GB", cpu_memory: int | str = "64GB", dtype: str | None = None,
                   offload_dir: str | None = None) -> AccelerateResult:
    """Greedy generation of ``gen_len`` tokens for every prompt with accelerate's ``device_map`` offloading.

    ``prompts``: token-id lists (any lengths; left-padded into one batch). ``device``: "auto" / "cuda" / "cpu".
    ``dtype``: compute dtype ("float32", "bfloat16", "float16"; default float32 on CPU, the checkpoint's dtype
    on CUDA). ``offload_dir``: parent of the offload folder (a fresh temporary folder in it is used and
    removed afterwards). Needs ``accelerate`` (the ``bench`` extra)."""
    if importlib.util.find_spec("accelerate") is None:  # transformers needs it for device_map
        raise ImportError("the accelerate baseline needs accelerate: pip install -e '.[bench]' (accelerate==1.15.0)")
    import transformers as tf
    from klotski.units import parse_bytes

    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in checkpoint directory {model_dir}")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    config = tf.AutoConfig.from_pretrained(model_dir)
    if dtype is None:
        ckpt = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = ckpt.replace("torch.", "") if cuda else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gpu_b, cpu_b = parse_bytes(gpu_memory), parse_bytes(cpu_memory)
    index = torch.device(device).index or 0
    max_memory = {index: gpu_b, "cpu": cpu_b} if cuda else {"cpu": gpu_b + cpu_b}

    folder = tempfile.mkdtemp(prefix="accelerate-offload-", dir=offload_dir)
    model = None
    try:
        t0 = time.perf_counter()
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", max_memory=max_memory,
                                                        offload_folder=folder, dtype=DTYPES[dtype])
        load_s = time.perf_counter() - t0
        model.eval()
        # Without hf_device_map everything fitted on one device and no hook was attached.
        device_map = dict(getattr(model, "hf_device_map", None) or {"": index if cuda else "cpu"})
        tiers = tier_summary(model, device_map)
        disk_b = disk_bytes_per_forward(model)

        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
        gen_cfg = copy.deepcopy(model.generation_config)
        gen_cfg.update(do_sample=False, max_new_tokens=gen_len, min_new_tokens=None, eos_token_id=None,
                       pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        ids, mask = left_pad_batch(prompts, pad)
        run_on = torch.device(device if cuda else "cpu")
        ids, mask = ids.to(run_on), mask.to(run_on)
        calls = [0]
        hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        with torch.inference_mode():
            warm = copy.deepcopy(gen_cfg)
            warm.update(max_new_tokens=1)  # one forward pass: every hook and weight touched once
            model.generate(input_ids=ids[:1], attention_mask=mask[:1], generation_config=warm)
            if cuda:
                torch.cuda.synchronize(run_on)
                torch.cuda.reset_peak_memory_stats(run_on)
            calls[0] = 0
            rss0, hwm_ok, read0 = _proc_kib("VmRSS"), _reset_peak_rss(), _storage_read_bytes()
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            if cuda:
                torch.cuda.synchronize(run_on)
            wall = time.perf_counter() - t0
        hook.remove()
        hwm, read1 = _proc_kib("VmHWM"), _storage_read_bytes()
        new = out[:, ids.shape[1]:].tolist()
        if any(len(t) != gen_len for t in new):
            raise RuntimeError(f"accelerate generated {[len(t) for t in new]} tokens, expected {gen_len} each")
        generated = len(prompts) * gen_len
        host_b = tiers.get("disk", {}).get("bytes", 0) + tiers.get("cpu", {}).get("bytes", 0)
        return AccelerateResult(
            tokens_per_s=generated / wall, wall_s=wall, load_s=load_s, generated_tokens=generated, token_ids=new,
            device=torch.cuda.get_device_name(run_on) if cuda else "cpu", dtype=dtype, max_memory=max_memory,
            device_map={k: v for k, v in device_map.items()}, tiers=tiers, forward_calls=calls[0],
            bytes_disk_read=disk_b * calls[0], bytes_h2d=host_b * calls[0] if cuda else 0,
            storage_read_bytes=(read1 - read0) if read0 is not None and read1 is not None else -1,
            peak_gpu_bytes=torch.cuda.max_memory_allocated(run_on) if cuda else None,
            peak_rss_growth_bytes=(hwm - rss0) * 1024 if hwm_ok and hwm is not None and rss0 is not None else None)
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (safetensors, HF layout)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, the checkpoint's dtype on CUDA")
    ap.add_argument("--gpu-memory", default="24GB")
    ap.add_argument("--cpu-memory", default="64GB")
    ap.add_argument("--offload-dir", default=None, help="parent folder of the offload folder (default: $TMPDIR)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()

    import transformers as tf
    from klotski.units import format_bytes

    vocab = tf.AutoConfig.from_pretrained(args.model).vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
    r = run_accelerate(args.model, prompts, args.gen_len, device=args.device, gpu_memory=args.gpu_memory,
                       cpu_memory=args.cpu_memory, dtype=args.dtype, offload_dir=args.offload_dir)
    tiers = ", ".join(f"{t} {v['modules']} modules {format_bytes(v['bytes'])}" for t, v in r.tiers.items())
    print(f"accelerate on {r.device} ({r.dtype}), max_memory {r.max_memory}: {tiers}")
    print(f"{r.generated_tokens} tokens in {r.wall_s:.2f} s = {r.tokens_per_s:.3f} tok/s "
          f"(load {r.load_s:.1f} s, {r.forward_calls} forward passes, disk-tier reads {format_bytes(r.bytes_disk_read)})")
    if r.peak_gpu_bytes is not None:
        print(f"peak GPU memory allocated {format_bytes(r.peak_gpu_bytes)}")
    if r.peak_rss_growth_bytes is not None:
        print(f"peak RSS growth over the call {format_bytes(r.peak_rss_growth_bytes)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **r.to_dict()}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
