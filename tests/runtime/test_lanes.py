"""Loader lanes: the host-compute lanes share the host's cores as one resource (tests of klotski.runtime.loader)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from klotski.runtime.loader import HostCPU, Lanes


def test_host_lanes_compute_one_at_a_time_with_their_thread_count():
    """cpu_attn and cpu_experts never compute at once (one CPU resource, as the simulator prices it), their
    threads run torch with ``host_threads`` intra-op threads, and the other lanes have no host CPU."""
    lanes = Lanes(torch.device("cpu"), timeout_s=30, host_threads=1)
    spans, lock = [], threading.Lock()

    def job(ln):
        time.sleep(0.02)  # outside the resource: may overlap the other lane
        with ln.host_cpu:
            t0 = time.monotonic()
            threads = torch.get_num_threads()
            time.sleep(0.05)
            t1 = time.monotonic()
        with lock:
            spans.append((t0, t1))
        return threads

    try:
        tickets = [lanes[n].submit(f"{n} {i}", job) for i in range(3) for n in Lanes.HOST_COMPUTE]
        assert [t.wait() for t in tickets] == [1] * 6
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"host compute overlapped: {spans}"
        assert all(lanes[n].host_cpu is None for n in Lanes.NAMES if n not in Lanes.HOST_COMPUTE)
        assert lanes["cpu_attn"].host_cpu is lanes["cpu_experts"].host_cpu
    finally:
        lanes.close()


def test_host_threads_default_to_the_callers_and_reject_nonsense():
    assert HostCPU().threads == torch.get_num_threads()
    for bad in (0, -2, 1.5, "4"):
        with pytest.raises(ValueError, match="host compute threads must be a positive int"):
            HostCPU(bad)
