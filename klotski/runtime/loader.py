"""Loader lanes: one worker thread per copy stream, jobs run in issue order, each returns a :class:`Ticket`.

Lanes are named by purpose as in the paper: ``prefetch`` (a layer's attention/gate weights and its hot
experts), ``expert_io`` (post-gate cold experts), ``kv_load`` and ``kv_store``. In CUDA mode each lane owns
a ``torch.cuda.Stream``: the job's copies are issued on it, an event is recorded after them and
:meth:`Ticket.wait` makes the *compute* stream wait on that event (no host sync). In CPU mode the job does the
copy itself on the worker thread (torch releases the GIL in copies and reads), so loads overlap compute.

The two host-compute lanes (``cpu_attn``, ``cpu_experts``) share one :class:`HostCPU`: each runs its torch ops
with the host's intra-op threads (all cores unless told otherwise), one lane's compute at a time, as the
simulator prices them (:data:`klotski.simulate.HOST_CPU`, one resource). Two lanes computing at once with all
cores each would oversubscribe the cores; copies and waits run outside the lock.

Every wait is bounded: :meth:`Ticket.wait` raises :class:`WaitTimeout` after the lane's ``timeout_s``
(:data:`WAIT_TIMEOUT_S` by default) naming the job, instead of hanging on a load that can never finish.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch


WAIT_TIMEOUT_S = 600.0  # longest a compute wait for one load (or a load for a pool slot) may take


class Cancelled(RuntimeError):
    """The job was dropped before it ran (an interrupted forward)."""


class WaitTimeout(TimeoutError):
    """A load (or a slot for it) did not arrive within the timeout: a stuck read, or a pool misused."""


class Ticket:
    """Completion of one job: ``wait()`` -> its result (re-raises the job's error)."""

    def __init__(self, name: str, timeout_s: float | None = WAIT_TIMEOUT_S, lane: str = ""):
        self.name = name
        self.timeout_s = timeout_s
        self.lane = lane
        self.result = None
        self.error: BaseException | None = None
        self.event = None  # CUDA: recorded on the lane's stream after the job's copies
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def finish(self, result=None, error: BaseException | None = None, event=None) -> None:
        self.result, self.error, self.event = result, error, event
        self._done.set()

    def wait(self):
        waited = 0.0
        while not self._done.wait(0.1):  # wake up regularly so KeyboardInterrupt is delivered
            waited += 0.1
            if self.timeout_s is not None and waited >= self.timeout_s:
                raise WaitTimeout(f"load {self.name!r} on lane {self.lane or '?'} did not finish within "
                                  f"{self.timeout_s:g} s (a stuck read, or a slot pool waiting for a release "
                                  f"that never comes)")
        if self.error is not None:
            raise self.error
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        return self.result


class HostCPU:
    """The host's cores as one resource shared by the host-compute lanes: ``with host_cpu:`` around a job's
    CPU compute holds it (one lane's compute at a time); ``threads`` torch intra-op threads per lane thread."""

    def __init__(self, threads: int | None = None):
        threads = torch.get_num_threads() if threads is None else threads
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"host compute threads must be a positive int, got {threads!r}")
        self.threads = threads
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


class Lane:
    """A worker thread running jobs ``fn(lane) -> result`` in submission order. ``host_cpu``: set on the
    host-compute lanes (their jobs compute under ``with lane.host_cpu:``; the thread uses its ``threads``)."""

    def __init__(self, name: str, device: torch.device, timeout_s: float | None = WAIT_TIMEOUT_S,
                 host_cpu: HostCPU | None = None):
        self.name = name
        self.device = device
        self.timeout_s = timeout_s
        self.host_cpu = host_cpu
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"klotski-{name}", daemon=True)
        self._thread.start()

    def submit(self, name: str, fn: Callable[["Lane"], object]) -> Ticket:
        ticket = Ticket(name, self.timeout_s, self.name)
        with self._lock:
            self._busy += 1
            self._idle.clear()
        self._queue.put((ticket, fn))
        return ticket

    def _run(self) -> None:
        if self.host_cpu is not None:
            torch.set_num_threads(self.host_cpu.threads)  # per thread (OpenMP): the lane's own ops only
        while True:
            item = self._queue.get()
            if item is None:
                return
            ticket, fn = item
            try:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        result = fn(self)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    ticket.finish(result, event=event)
                else:
                    ticket.finish(fn(self))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                ticket.finish(error=e)
            finally:
                with self._lock:
                    self._busy -= 1
                    if self._busy == 0:
                        self._idle.set()

    def drain(self) -> None:
        """Drop queued jobs (their tickets raise Cancelled) and wait for the running one to end."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            ticket, _ = item
            ticket.finish(error=Cancelled(f"{self.name}: {ticket.name} cancelled"))
            with self._lock:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()
        self._idle.wait()

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    def close(self) -> None:
        self.drain()
        self._queue.put(None)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Lanes:
    NAMES = ("prefetch", "expert_io", "kv_load", "kv_store", "cpu_attn", "cpu_experts")
    HOST_COMPUTE = ("cpu_attn", "cpu_experts")  # lanes computing on the host: they share one HostCPU

    def __init__(self, device: torch.device, timeout_s: float | None = WAIT_TIMEOUT_S,
                 host_threads: int | None = None):
        self.lanes: dict[str, Lane] = {}
        self.host_cpu = HostCPU(host_threads)
        try:
            for n in self.NAMES:
                self.lanes[n] = Lane(n, device, timeout_s, self.host_cpu if n in self.HOST_COMPUTE else None)
        except BaseException:  # interrupted while starting threads: stop those already running
            self.close()
            raise

    def __getitem__(self, name: str) -> Lane:
        return self.lanes[name]

    def drain(self) -> None:
        for lane in self.lanes.values():
            lane.drain()

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())
