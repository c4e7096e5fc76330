"""``klotski convert MODEL_DIR OUT_DIR``: pack a checkpoint's experts for one-request O_DIRECT loads."""
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

    manifest = convert_checkpoint(args.model_dir, args.out_dir, progress=progress, replace=args.replace)
    if bar is not None:
        bar.close()
    nbytes = sum(f["nbytes"] for f in manifest["files"].values())
    print(f"wrote {args.out_dir}: {len(manifest['experts'])} experts in {len(manifest['moe_layers'])} MoE layers, "
          f"{nbytes / 2**20:.1f} MiB")
    if args.verify:
        n = ExpertStore(args.out_dir).verify()
        print(f"verified {n} experts: checksums match")
    return 0
