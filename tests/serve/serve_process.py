"""``klotski serve`` as a real subprocess on a free localhost port (:class:`ServerProcess`)."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m klotski serve ...``: started, waited for (``/health``), stopped (SIGTERM, then kill)."""

    def __init__(self, model_dir: str, log_path: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model_dir
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "klotski", "serve", "--model", model_dir, "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32", "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"klotski serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"klotski serve did not come up in {START_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def metrics(self) -> dict:
        """Unlabelled samples and labelled ones as ``name{labels}``: value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, predicate, timeout_s: float = 30.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; metrics: "
                                     f"{ {k: v for k, v in m.items() if 'bucket' not in k} }")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode
