"""``klotski convert MODEL_DIR OUT_DIR [--quantize int4 --group-size 128 --symmetric]``: pack a checkpoint's
experts for one-request O_DIRECT loads, optionally quantized to int4."""
from __future__ import annotations

import sys


def add_parser(sub):
    p = sub.add_parser("convert", help="rewrite a checkpoint into a packed expert store (4 KiB-aligned experts)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-layout checkpoint (config.json + safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="output directory: new, empty, or holding a store of the same checkpoint")
    p.add_argument("--replace", action="store_true",
                   help="replace another checkpoint's store (or Klotski files) in OUT_DIR; other files are kept")
    p.add_argument("--verify", action="store_true", help="re-read every expert and check its checksum")
    p.add_argument("--quantize", choices=["int4"], default=None,
                   help="store the routed experts as int4 (round-to-nearest, group-wise scales); run with "
                        "LLM(..., quantization='int4', offload_dir=OUT_DIR). A pre-quantized GPTQ / AWQ / "
                        "compressed-tensors checkpoint is always stored as int4, from its own codes (the "
                        "--group-size / --symmetric / --clip-search options do not apply)")
    p.add_argument("--group-size", type=int, default=128, help="int4: input columns per scale (default 128)")
    p.add_argument("--symmetric", action="store_true", help="int4: no zero points (zero point 8)")
    p.add_argument("--clip-search", action="store_true",
                   help="int4: per group, also try ranges shrunk by 5-25%% and keep the least squared error")
    return p


def run(args) -> int:
    from klotski.store import ExpertStore, convert_checkpoint

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = None

    def progress(what, done, total):
        nonlocal bar
        if tqdm is None or what != "experts":
            return
        if bar is None:
            bar = tqdm(total=total, desc="packing MoE layers", unit="layer", file=sys.stderr)
        bar.n = done
        bar.refresh()

    manifest = convert_checkpoint(args.model_dir, args.out_dir, progress=progress, replace=args.replace, quantize=args.quantize,
                                  group_size=args.group_size, symmetric=args.symmetric,
                                  clip_search=args.clip_search)
    if bar is not None:
        bar.close()
    nbytes = sum(f["nbytes"] for f in manifest["files"].values())
    q = manifest.get("quantization")
    print(f"wrote {args.out_dir}: {len(manifest['experts'])} experts in {len(manifest['moe_layers'])} MoE layers, "
          f"{nbytes / 2**20:.1f} MiB" + (f", int4 experts (group {q['group_size']}, "
                                          f"{'symmetric' if q['symmetric'] else 'zero points'}) from {q['source']}"
                                          if q else ""))
    if args.verify:
        n = ExpertStore(args.out_dir).verify()
        print(f"verified {n} experts: checksums match")
    return 0
