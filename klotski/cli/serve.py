"""``klotski serve --model DIR``: an OpenAI-compatible HTTP server (:mod:`klotski.serve`; the serve extra)."""
from __future__ import annotations

import sys

from klotski.cli.options import add_engine_args, build_llm


def add_parser(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server that batches concurrent requests "
                                     '(pip install "klotski[serve]")')
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory (config.json + safetensors)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences per batch group under the resident policy (offloaded: the plan's batch x n)")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the oldest queued request waits for its batch group to fill (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for admission; more get 429 (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight get to finish (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_engine_args(p, traces=False)
    return p


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f'klotski serve: error: the server needs {e.name}, which is not installed: pip install "klotski[serve]"',
              file=sys.stderr)
        return 2
    for name in ("max_num_seqs", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.drain_timeout < 0:
        raise ValueError("--max-wait-ms and --drain-timeout must be >= 0")
    from klotski.serve.server import serve

    llm = build_llm(args, args.model)
    return serve(llm, args.served_model_name or args.model, args.host, args.port, args.max_wait_ms,
                 args.max_queue, args.drain_timeout, args.log_level)
