"""``klotski serve`` under concurrent clients, against the same prompts sent one at a time.

    python bench/serve/bench_serve.py                                   # CPU: the trained tiny MoE, offloaded
    python bench/serve/bench_serve.py --clients 32 --requests 96 --max-tokens 16 --policy klotski \
        --gpu-memory 16MiB --cpu-memory 8MiB

Starts the server as a subprocess on a free localhost port (the model offloaded under ``--policy`` with the
budgets given; the disk tier in a temporary ``--offload-dir`` unless one is named), warms it up with one
request, then runs two phases over the same ``--requests`` distinct prompts (greedy, ``--max-tokens`` each):

* ``sequential``: one client, one request at a time;
* ``concurrent``: ``--clients`` clients, each sending its next prompt as soon as its last one is answered.

Per phase: requests/s, output tokens/s, latency percentiles (p50 / p90 / p99, seconds from send to the full
answer) and the batch groups the server formed (from its ``/metrics`` histogram). Checks: every prompt is
answered exactly once in each phase, the server counted exactly the sequences sent (nothing lost or run twice)
and the two phases return the same greedy tokens for every prompt (no answer given to the wrong request).
Prints a table and writes JSON to ``bench/results/`` (``--json`` to choose the file). Bounded: the client
count, the request count and ``--timeout-s`` for the whole run; localhost only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(ROOT, "klotski", "assets", "tiny_moe")
STARTERS = ["def main():\n    ", "    return self.", "# Copyright", "    if not isinstance(", "import os\n",
            "class Parser:\n    def __init__(self", "    for key, value in ", "    raise ValueError(",
            "def read(path):\n    with open(", "    except OSError as e:\n        "]


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts (a numbered comment before a code starter), so answers cannot be confused."""
    return [f"# case {i}\n{STARTERS[i % len(STARTERS)]}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_idle(url: str, timeout_s: float = 120.0) -> dict:
    """The server's metrics once nothing is queued or in the engine (a group's counts are recorded when its
    ``generate`` call returns, just after its last answer has been sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        if (m["klotski_engine_busy"] == 0 and m["klotski_requests_queued"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def scrape(url: str) -> dict:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def group_stats(before: dict, after: dict) -> dict:
    """Batch groups formed between two scrapes: count, mean size, and the histogram's bucket counts."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith("klotski_batch_group_size")}
    count, total = d["klotski_batch_group_size_count"], d["klotski_batch_group_size_sum"]
    buckets, prev = {}, 0.0
    for k, v in d.items():
        if "_bucket" in k:
            le = k.split('le="')[1].rstrip('"}')
            if v - prev > 0:
                buckets[f"<={le}"] = int(v - prev)
            prev = v
    return {"groups": int(count), "sequences": int(total), "mean_size": total / count if count else 0.0,
            "size_buckets": buckets}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run_phase(url: str, model: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    """``clients`` closed-loop clients share the prompts; returns per-prompt answers and timings."""
    answers: dict[int, list] = {}
    latencies: list[float] = []
    next_index = iter(range(len(texts)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            body = {"model": model, "prompt": texts[i], "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            answers.setdefault(i, []).append(choice["token_ids"])

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(len(a[0]) for a in answers.values())
    return {"clients": clients, "requests": len(texts), "wall_s": wall, "requests_per_s": len(texts) / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p90_s": percentile(latencies, 0.9),
            "latency_p99_s": percentile(latencies, 0.99), "answers": answers}


def measure(url: str, model: str, texts: list[str], clients: int, max_tokens: int, deadline: float) -> dict:
    """One phase, bounded by ``deadline`` (time.monotonic())."""
    before = scrape_idle(url)
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("--timeout-s passed before the phase started")
    phase = asyncio.run(asyncio.wait_for(run_phase(url, model, texts, clients, max_tokens), left))
    after = scrape_idle(url)
    phase["batch_groups"] = group_stats(before, after)
    phase["server_finished"] = int(sum(v - before.get(k, 0.0) for k, v in after.items()
                                       if k.startswith("klotski_requests_finished_total")))
    return phase


def start_server(args, port: int, offload_dir: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "klotski", "serve", "--model", args.model, "--port", str(port),
           "--host", "127.0.0.1", "--policy", args.policy, "--device", args.device, "--dtype", args.dtype,
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(256, args.clients * 2)),
           "--log-level", "warning"]
    if args.policy != "resident":
        cmd += ["--offload-dir", offload_dir]
        cmd += ["--gpu-memory", args.gpu_memory] if args.gpu_memory else []
        cmd += ["--cpu-memory", args.cpu_memory] if args.cpu_memory else []
        cmd += ["--batch-size", str(args.batch_size), "--num-batches", str(args.num_batches)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not come up in time")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: the trained tiny MoE)")
    ap.add_argument("--policy", default="klotski", help="klotski, flexgen, layerwise or resident")
    ap.add_argument("--gpu-memory", default="16MiB")
    ap.add_argument("--cpu-memory", default="8MiB")
    ap.add_argument("--offload-dir", default=None, help="disk tier (default: a temporary directory)")
    ap.add_argument("--batch-size", default="auto", help="sequences per batch (auto: the planner's choice)")
    ap.add_argument("--num-batches", default="auto", help="batches per group, n (auto: the planner's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (1..256)")
    ap.add_argument("--requests", type=int, default=96, help="distinct prompts per phase (1..4096)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=20.0, help="the server's --max-wait-ms")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="bound on the whole run")
    ap.add_argument("--json", default=None, help="output file (default: bench/results/serve-<time>.json)")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 4096:
        ap.error("--clients must be in 1..256 and --requests in 1..4096")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    texts = prompts(args.requests)
    tmp = tempfile.TemporaryDirectory(prefix="klotski-bench-serve-")
    offload_dir = args.offload_dir or os.path.join(tmp.name, "offload")
    log_path = os.path.join(tmp.name, "server.log")
    deadline = time.monotonic() + args.timeout_s
    with open(log_path, "w") as log:
        proc = start_server(args, port, offload_dir, log)
        try:
            wait_healthy(url, proc, deadline)
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            asyncio.run(run_phase(url, model, ["# warm-up\n"], 1, args.max_tokens))  # plan, prefetch table
            seq = measure(url, model, texts, 1, args.max_tokens, deadline)
            conc = measure(url, model, texts, args.clients, args.max_tokens, deadline)
            capacity = int(scrape(url)["klotski_batch_group_capacity"])
        except BaseException:
            log.flush()
            print(open(log_path).read()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait(10)

    problems = []
    for name, phase in (("sequential", seq), ("concurrent", conc)):
        missing = [i for i in range(len(texts)) if i not in phase["answers"]]
        doubled = [i for i, a in phase["answers"].items() if len(a) != 1]
        if missing or doubled:
            problems.append(f"{name}: prompts unanswered {missing[:5]} or answered twice {doubled[:5]}")
        if phase["server_finished"] != len(texts) or phase["batch_groups"]["sequences"] != len(texts):
            problems.append(f"{name}: the server finished {phase['server_finished']} sequences in groups of "
                            f"{phase['batch_groups']['sequences']}, {len(texts)} were sent")
    differ = [i for i in range(len(texts)) if seq["answers"].get(i) != conc["answers"].get(i)]
    if differ:
        problems.append(f"greedy tokens differ between the phases for prompts {differ[:5]}")
    if status != 0:
        problems.append(f"the server exited with status {status} after SIGTERM")
    speedup = conc["output_tokens_per_s"] / seq["output_tokens_per_s"]

    header = f"{'phase':>10}  {'clients':>7}  {'req/s':>7}  {'out tok/s':>9}  {'p50 s':>6}  {'p90 s':>6}  " \
             f"{'p99 s':>6}  {'groups':>6}  {'mean group':>10}  group sizes"
    print(f"model {os.path.relpath(args.model, ROOT)}, policy {args.policy} (gpu {args.gpu_memory}, cpu "
          f"{args.cpu_memory}, batch {args.batch_size} x n {args.num_batches}), "
          f"{args.requests} prompts x {args.max_tokens} greedy tokens, group capacity {capacity}, "
          f"--max-wait-ms {args.max_wait_ms}")
    print(header)
    print("-" * len(header))
    for name, p in (("sequential", seq), ("concurrent", conc)):
        g = p["batch_groups"]
        print(f"{name:>10}  {p['clients']:>7}  {p['requests_per_s']:>7.2f}  {p['output_tokens_per_s']:>9.1f}  "
              f"{p['latency_p50_s']:>6.2f}  {p['latency_p90_s']:>6.2f}  {p['latency_p99_s']:>6.2f}  "
              f"{g['groups']:>6}  {g['mean_size']:>10.1f}  {g['size_buckets']}")
    print(f"concurrent / sequential output tokens/s: {speedup:.2f}x (target >= 4x at 32 clients)")
    print("no request lost or duplicated; greedy tokens identical in both phases" if not problems
          else "PROBLEMS: " + "; ".join(problems))

    out = args.json or os.path.join(ROOT, "bench", "results", f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    record = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k != "json"}, "group_capacity": capacity,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "speedup_output_tokens_per_s": speedup, "problems": problems,
              "phases": {name: {k: v for k, v in p.items() if k != "answers"}
                         for name, p in (("sequential", seq), ("concurrent", conc))}}
    tmp_out = out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp_out, out)
    print(f"wrote {os.path.relpath(out, ROOT)}")
    tmp.cleanup()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
