"""``klotski profile``: measure this machine (or show a preset) and cache the profile as JSON."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("profile", help="measure H2D / disk bandwidth, matmul and attention rates, memory")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--output", default=None,
                   help="also write the profile JSON here (it is always cached where the runtime reads it: "
                        "~/.cache/klotski/hardware-<device>.json)")
    p.add_argument("--disk-dir", default=None, help="directory whose disk is measured (default: temp dir)")
    p.add_argument("--full", action="store_true", help="larger, slower measurements")
    p.add_argument("--preset", default=None, help="print a named preset instead of measuring")
    p.add_argument("--list-presets", action="store_true")
    return p


def run(args) -> int:
    import json

    import torch

    from klotski.hardware import PRESETS, preset
    from klotski.profile_cache import ProfileCache, is_provisional

    if args.list_presets:
        for hw in PRESETS.values():
            print(hw.summary())
        return 0
    if args.preset:
        print(json.dumps(preset(args.preset).to_dict(), indent=2))
        return 0
    cache = ProfileCache()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hw = cache.measure(device, disk_dir=args.disk_dir, quick=not args.full)
    print(hw.summary())
    if is_provisional(hw):
        print(f"not cached: {hw.notes.rsplit('provisional: ', 1)[-1]}; the cached profile "
              f"{cache.path(device)} is unchanged")
    else:
        print(f"saved {cache.path(device)}")
    if args.output:
        print(f"wrote {hw.save(args.output)}")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="klotski")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    raise SystemExit(run(parser.parse_args(["profile", *sys.argv[1:]])))
