"""A plain-text table of run metrics, one row per policy."""
from __future__ import annotations

from klotski.units import format_bytes


def _bytes(v) -> str:
    return "-" if v is None else format_bytes(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def metrics_row(policy: str, m) -> dict:
    x = m.extra
    decode = x.get("decode_s")
    return {
        "policy": policy,
        "tokens/s": f"{m.tokens_per_s:.1f}",
        "predicted": f"{x['predicted_tokens_per_s']:.1f}" if x.get("predicted_tokens_per_s") else "-",
        "batch x n": f"{x['batch_size']}x{x['num_batches']}" if "batch_size" in x else "-",
        "prefill s": f"{x.get('prefill_s', m.prefill_s):.2f}",
        "decode s": "-" if decode is None else f"{decode:.2f}",
        "bubble": _pct(x.get("bubble_fraction")),
        "disk read": _bytes(x.get("bytes_disk_read")),
        "h2d": _bytes(x.get("bytes_h2d")),
        "peak gpu": _bytes(x.get("peak_gpu_bytes")),
        "peak cpu": _bytes(x.get("peak_cpu_bytes")),
        "prefetch P/R": (f"{_pct(x['prefetch_precision'])}/{_pct(x['prefetch_recall'])}"
                         if x.get("prefetch_predictions") else "-"),
    }


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
