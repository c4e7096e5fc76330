"""Write a random-weight checkpoint of a real model's shapes, streaming: tensor by tensor, never the whole model.

    python bench/e2e/make_checkpoint.py qwen3-30b-a3b /data/qwen3-24l --layers 24 --device cuda
    python bench/e2e/make_checkpoint.py mixtral-8x7b /tmp/tiny --layers 2 \\
        --override hidden_size=64 --override intermediate_size=128 --override vocab_size=256 --dtype float32

MODEL is a preset of :mod:`klotski.presets` (mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite, olmoe-1b-7b, ...)
or a ``config.json`` path. Names, shapes and dtypes come from the transformers model built on the meta device,
passed through the same steps as ``save_pretrained`` (tied weights removed, weight conversions reverted), so
the files hold exactly the keys transformers 5 writes and loads: per-expert tensors by default
(``...experts.{e}.gate_proj.weight`` / Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``), or with
``--experts-layout fused`` the model's own 3-D ``experts.gate_up_proj`` / ``experts.down_proj`` (which
transformers and klotski load as well).

Values: matrices ~ N(0, 1/sqrt(fan_in)) with fan_in the last dimension (activations stay O(1) through many
layers), norm weights 1 + N(0, 0.05), biases N(0, 0.02); tensors transformers keeps in fp32 (DeepSeek-V3's
``e_score_correction_bias``) are written in fp32. Every tensor has its own generator seeded from (seed, name),
so values do not depend on the shard size, the order or the device count... but cuda and cpu draw different
numbers.

Files: ``config.json`` (num_hidden_layers truncated, ``dtype``/``torch_dtype`` set), shards
``model-0000i-of-0000N.safetensors`` (greedy split at ``--shard-size``, like transformers) and
``model.safetensors.index.json``. Everything is written under ``OUT.partial`` (each file fsynced) and the
directory renamed to OUT at the end: an interrupted run leaves no complete-looking checkpoint. Host memory
peaks at a few tensors (drawn ahead: at most 512 MiB or one tensor on cpu; two queued for the writer), not a
shard.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench scripts are not a package

from random_tensors import Sampler  # noqa: E402

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
MARKER = ".klotski-make-checkpoint"  # names a staging directory this script may delete


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: ``shape`` in ``dtype``, filled as ``mean + std * N(0, 1)``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mean: float
    std: float

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class CheckpointReport:
    path: str
    config: dict
    num_tensors: int
    num_shards: int
    total_bytes: int
    seconds: float
    layout: str
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / 1e9 / self.seconds if self.seconds else 0.0


def load_config(model: str, layers: int | None = None, overrides: dict | None = None) -> tuple[dict, list[str]]:
    """The config dict of preset or ``config.json`` path ``model``, overridden and truncated to ``layers``.
    Returns (config, notes)."""
    from klotski.presets import MODEL_CONFIGS, model_config

    notes = []
    if os.path.isfile(model) or model.endswith(".json") or os.path.isdir(model):
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            cfg = json.load(f)
    else:
        try:
            cfg = model_config(model)
        except KeyError:
            raise ValueError(f"{model!r} is neither a config.json path nor a preset; presets: "
                             f"{', '.join(MODEL_CONFIGS)}") from None
    for key, value in (overrides or {}).items():
        cfg[key] = value
    if cfg.pop("quantization_config", None) is not None:
        notes.append("quantization_config dropped: the random weights are written unquantized")
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    dense = cfg.get("first_k_dense_replace") or 0
    if dense and cfg["num_hidden_layers"] <= dense:
        notes.append(f"num_hidden_layers {cfg['num_hidden_layers']} <= first_k_dense_replace {dense}: no MoE layer")
    return cfg, notes


def parse_override(text: str) -> tuple[str, object]:
    """``"hidden_size=64"`` -> ("hidden_size", 64); values parsed as JSON, else kept as strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override expects key=value, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def transformers_config(cfg: dict, dtype: torch.dtype):
    import transformers as tf

    d = dict(cfg)
    model_type = d.pop("model_type")
    d.pop("torch_dtype", None)
    d["dtype"] = str(dtype).replace("torch.", "")
    return tf.AutoConfig.for_model(model_type, **d)


def tensor_plan(tf_config, dtype: torch.dtype, layout: str = "per-expert") -> list[TensorSpec]:
    """Every tensor ``save_pretrained`` would write for ``tf_config`` (meta model: nothing is allocated)."""
    import transformers as tf
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if layout not in ("per-expert", "fused"):
        raise ValueError(f"experts layout must be 'per-expert' or 'fused', got {layout!r}")
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf_config, dtype=dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    if layout == "per-expert":
        state = revert_weight_conversion(model, state)
    fp32 = set(model._keep_in_fp32_modules_strict or ())
    if dtype == torch.float16:
        fp32 |= set(model._keep_in_fp32_modules or ())
    out = []
    for name, t in state.items():
        shape = tuple(t.shape)
        tdtype = torch.float32 if any(k in name.split(".") for k in fp32) else dtype
        leaf = name.rsplit(".", 2)
        if name.endswith(".bias") or name.endswith("_bias"):
            mean, std = 0.0, 0.02
        elif len(shape) == 1 and "norm" in (leaf[-2] if len(leaf) > 1 else name):
            mean, std = 1.0, 0.05
        elif len(shape) == 1:
            mean, std = 0.0, 0.02
        else:
            mean, std = 0.0, shape[-1] ** -0.5
        out.append(TensorSpec(name, shape, tdtype, mean, std))
    return out


def split_shards(tensors: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order (transformers' rule): a shard closes when the next tensor would overflow it; a
    tensor larger than ``shard_bytes`` gets a shard of its own."""
    shards, cur, size = [], [], 0
    for t in tensors:
        if cur and size + t.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        shards.append(cur)
    return shards


def shard_header(shard: list[TensorSpec]) -> bytes:
    """The safetensors header of ``shard`` (8-byte length + JSON padded with spaces to 8 bytes)."""
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        head[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def free_bytes(path: str) -> int:
    """Free bytes on the file system that would hold ``path`` (its nearest existing ancestor)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer(q: queue.Queue, errors: list) -> None:
    """Writes (file, tensor) items in order; None closes the current file (fsync); a final sentinel stops."""
    f = None
    while True:
        item = q.get()
        if item == "stop":
            return
        if errors:
            continue
        try:
            kind, value = item
            if kind == "open":
                f = open(value[0], "wb")
                f.write(value[1])
            elif kind == "tensor":
                f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            else:  # "close"
                f.flush()
                os.fsync(f.fileno())
                f.close()
                f = None
        except BaseException as e:  # reported by the producer
            errors.append(e)
            if f is not None:
                f.close()


def make_checkpoint(out_dir: str, model: str, layers: int | None = None, dtype: str = "bfloat16",
                    device: str = "cpu", shard_size: str | int = "4GB", seed: int = 0,
                    overrides: dict | None = None, experts_layout: str = "per-expert", force: bool = False,
                    log=print) -> CheckpointReport:
    """Write the random checkpoint of ``model`` (preset or config.json) to ``out_dir``; see the module docstring.

    Raises FileExistsError when ``out_dir`` exists (unless ``force``), OSError when the file system lacks
    the space (naming the bytes needed and free), ValueError on a bad preset, dtype or layout."""
    from klotski.units import format_bytes, parse_bytes

    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype, None)
    if torch_dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but torch.cuda.is_available() is False")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; remove it or pass force=True (--force)")
    cfg, notes = load_config(model, layers, overrides)
    tf_config = transformers_config(cfg, torch_dtype)
    tensors = tensor_plan(tf_config, torch_dtype, experts_layout)
    shards = split_shards(tensors, parse_bytes(shard_size))
    headers = [shard_header(s) for s in shards]
    data_bytes = sum(t.nbytes for t in tensors)
    need = data_bytes + sum(len(h) for h in headers) + (1 << 20)  # + config, index, slack
    free = free_bytes(out_dir)
    reclaim = 0
    if force and os.path.isdir(out_dir):
        reclaim = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out_dir) for f in fs)
    log(f"{model}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, {len(tensors)} tensors "
        f"({experts_layout}), {sum(t.nbytes // t.dtype.itemsize for t in tensors) / 1e6:.1f} M params, "
        f"{format_bytes(data_bytes, binary=False)} in {len(shards)} shard(s) of <= {shard_size}; "
        f"{format_bytes(free + reclaim, binary=False)} free at {os.path.dirname(out_dir)}")
    for n in notes:
        log(f"note: {n}")
    if need > free + reclaim:
        raise OSError(f"not enough disk space for {out_dir}: the checkpoint needs {need / 1e9:.2f} GB "
                      f"({need} bytes), the file system has {(free + reclaim) / 1e9:.2f} GB ({free + reclaim} "
                      f"bytes) free; use fewer --layers or another directory")

    stage = out_dir + ".partial"
    if os.path.exists(stage):
        if not os.path.exists(os.path.join(stage, MARKER)):
            raise FileExistsError(f"{stage} exists and was not made by this script; remove it by hand")
        shutil.rmtree(stage)
    os.makedirs(stage)
    open(os.path.join(stage, MARKER), "w").close()
    tf_config.save_pretrained(stage)
    cpath = os.path.join(stage, "config.json")
    with open(cpath) as f:
        written = json.load(f)
    written["torch_dtype"] = written.get("dtype") or dtype  # readers of either key
    with open(cpath, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())

    sampler = Sampler(dev, seed)
    q: queue.Queue = queue.Queue(maxsize=2)
    errors: list = []
    writer = threading.Thread(target=_writer, args=(q, errors), name="make-checkpoint-writer", daemon=True)
    writer.start()
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, done = {}, 0
    try:
        for i, (shard, head) in enumerate(zip(shards, headers)):
            tmp = os.path.join(stage, names[i] + ".tmp")
            q.put(("open", (tmp, head)))
            for t, x in sampler.draw(shard):
                if errors:
                    raise errors[0]
                q.put(("tensor", x))
                weight_map[t.name] = names[i]
                done += t.nbytes
            q.put(("close", None))
            log(f"  shard {i + 1}/{len(shards)} queued: {format_bytes(done, binary=False)} of "
                f"{format_bytes(data_bytes, binary=False)}, "
                f"{time.perf_counter() - t0:.1f} s")
    finally:
        q.put("stop")
        writer.join()
        sampler.close()
    if errors:
        raise errors[0]
    for n in names:
        os.replace(os.path.join(stage, n + ".tmp"), os.path.join(stage, n))
    index = {"metadata": {"total_size": data_bytes,
                          "total_parameters": sum(t.nbytes // t.dtype.itemsize for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(stage, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.remove(os.path.join(stage, MARKER))
    _fsync_dir(stage)
    if os.path.exists(out_dir):  # force
        shutil.rmtree(out_dir)
    os.rename(stage, out_dir)
    _fsync_dir(os.path.dirname(out_dir))
    seconds = time.perf_counter() - t0
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in names)
    log(f"wrote {out_dir}: {format_bytes(total, binary=False)} in {len(names)} shard(s), {seconds:.1f} s "
        f"({total / 1e9 / seconds:.2f} GB/s, generated on {dev.type})")
    return CheckpointReport(out_dir, written, len(tensors), len(names), total, seconds, experts_layout, notes)


def main(argv: list[str] | None = None) -> CheckpointReport:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="preset name (klotski.presets) or config.json path")
    ap.add_argument("out", help="output directory (must not exist unless --force)")
    ap.add_argument("--layers", type=int, help="truncate num_hidden_layers to N (other fields kept)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cpu", help="where values are drawn: cpu or cuda")
    ap.add_argument("--shard-size", default="4GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", type=parse_override, default=[], metavar="KEY=VALUE",
                    help="set a config field (JSON value), e.g. hidden_size=64; repeatable")
    ap.add_argument("--experts-layout", default="per-expert", choices=("per-expert", "fused"),
                    help="per-expert: the keys transformers' save_pretrained writes (default); fused: the "
                         "model's 3-D experts.gate_up_proj / experts.down_proj")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    try:
        return make_checkpoint(args.out, args.model, layers=args.layers, dtype=args.dtype, device=args.device,
                               shard_size=args.shard_size, seed=args.seed, overrides=dict(args.override),
                               experts_layout=args.experts_layout, force=args.force)
    except (ValueError, OSError) as e:
        sys.exit(f"make_checkpoint: {e}")


if __name__ == "__main__":
    main()
