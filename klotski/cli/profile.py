"""``klotski profile``: measure this machine (or show a preset) and cache the profile as JSON."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("profile", help="measure H2D / disk bandwidth, matmul and attention rates, memory")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--output", default=None, help="profile JSON path (default: ~/.cache/klotski/hardware.json)")
    p.add_argument("--disk-dir", default=None, help="directory whose disk is measured (default: temp dir)")
    p.add_argument("--full", action="store_true", help="larger, slower measurements")
    p.add_argument("--preset", default=None, help="print a named preset instead of measuring")
    p.add_argument("--list-presets", action="store_true")
    return p


def run(args) -> int:
    import json

    from klotski.hardware import PRESETS, measure_profile, preset

    if args.list_presets:
        for hw in PRESETS.values():
            print(hw.summary())
        return 0
    if args.preset:
        print(json.dumps(preset(args.preset).to_dict(), indent=2))
        return 0
    hw = measure_profile(device=args.device, disk_dir=args.disk_dir, quick=not args.full)
    path = hw.save(args.output)
    print(hw.summary())
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="klotski")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    raise SystemExit(run(parser.parse_args(["profile", *sys.argv[1:]])))
