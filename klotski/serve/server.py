"""Run the app under uvicorn; SIGTERM / Ctrl-C drain the requests in flight, up to a deadline, then exit.

On the first SIGTERM or SIGINT the server stops accepting connections and waits up to ``drain_timeout_s`` for
the requests in flight (queued or generating) to finish; those still running then are cancelled. The engine
worker is stopped and joined, the ``LLM`` closed, and the process exits with status 0. A second Ctrl-C exits
at once.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from klotski.serve.app import build_app
from klotski.serve.batcher import EngineWorker
from klotski.serve.chat import ChatTemplate

log = logging.getLogger("klotski.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a handled SIGTERM / SIGINT is not raised again after the drain (uvicorn
    re-raises it, which would end the process by the signal instead of a clean exit)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.warning("%s: draining the requests in flight (up to %s s), then exiting",
                        signal.Signals(sig).name, self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_wait_ms: float = 20.0,
          max_queue: int = 256, drain_timeout_s: float = 30.0, log_level: str = "info") -> int:
    """Serve ``llm`` (a :class:`klotski.engine.LLM`, closed on return) until SIGTERM / SIGINT."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    worker = EngineWorker(llm, max_wait_s=max_wait_ms / 1000.0, max_queue=max_queue)
    app = build_app(worker, model_name, ChatTemplate.from_model_dir(llm.model_dir))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s)
    server = DrainingServer(config)
    try:
        server.run()
    finally:
        worker.stop()  # idempotent: the lifespan has stopped it unless startup failed
        llm.close()
    return 0 if server.started else 1
