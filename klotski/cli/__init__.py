"""``klotski`` command line. Each verb is a module here with ``add_parser(subparsers)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("demo", "generate", "bench", "plan", "profile", "convert", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klotski", description="Offloaded MoE inference on one GPU.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}")
    for verb in VERBS:
        module = importlib.import_module(f"klotski.cli.{verb}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from klotski.store import DirectoryBusyError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, DirectoryBusyError) as e:
        print(f"klotski {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # an unknown name (preset, hardware): its message, one line, not a traceback
        print(f"klotski {args.verb}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
