"""What the bench/distributed scripts share: the command that produced a result, and writing it atomically."""
from __future__ import annotations

import json
import os


def command_line(script: str, args) -> str:
    """``python bench/distributed/<script> --opt value ...`` from parsed ``args`` (``--json`` left out)."""
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json")
    return f"python bench/distributed/{script} {opts}"


def write_json(path: str, result: dict) -> str:
    """Write ``result`` to ``path`` through a temporary file (an interrupted run leaves no partial JSON)."""
    path = os.path.normpath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path
