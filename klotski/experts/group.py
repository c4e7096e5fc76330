"""What the offloaded-experts modules of one model share: budgets, the loader thread, disk I/O, the prefetcher.

Each :class:`~klotski.experts.OffloadedExperts` registers with one :class:`ExpertOffloadGroup` (in layer order).
The group

* splits the budgets (``gpu_memory``: device expert slots; ``cpu_memory``: host-resident experts plus the
  pinned staging ring of the disk tier; the same memory-size strings as :class:`klotski.LLM`) evenly over its
  ``num_layers`` layers and accounts them in :class:`~klotski.runtime.memory.TierMeter`\\ s, so a budget too
  small for one device slot per layer fails at construction with the minimum it needs;
* runs every expert load (host -> device copy, or disk read into a staging slot then copy) on one loader
  thread, demand loads before prefetches, each returning a :class:`concurrent.futures.Future`; on CUDA the
  copies are issued on a side stream and the future's result carries an event the compute stream waits on;
* learns the routing with a :class:`klotski.prefetch.CorrelationPrefetcher` (module ``i`` is its layer ``i``)
  and, as soon as one layer's experts are known, asks the next layer's module to prefetch the experts the
  table predicts for the same tokens.

``close()`` stops the loader thread (waiting for the job in progress) and the disk reader; the group is also
a context manager.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future

import torch

from klotski.prefetch import CorrelationPrefetcher
from klotski.runtime.memory import BudgetError, TierMeter
from klotski.units import format_bytes, parse_bytes

DEMAND, PREFETCH = 0, 1  # job priorities: lower runs first
STAGING_SLOTS = 2


class ExpertOffloadGroup:
    """Shared state of ``num_layers`` offloaded-experts modules on ``device`` under ``gpu_memory`` /
    ``cpu_memory`` (ints or strings such as ``"24GiB"``). ``prefetch``: predict and load the next layer's
    experts; ``prefetch_table``: a saved :class:`CorrelationPrefetcher` table to start from (its popularity
    also decides which experts the host tier keeps)."""

    def __init__(self, num_layers: int, *, gpu_memory, cpu_memory, prefetch: bool = True,
                 prefetch_table: str | None = None, io_mode: str | None = None):
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.gpu = TierMeter("gpu", parse_bytes(gpu_memory))
        self.cpu = TierMeter("cpu", parse_bytes(cpu_memory))
        self.prefetch_enabled = bool(prefetch)
        self.prefetch_table = prefetch_table
        self.io_mode = io_mode
        self.modules: list = []
        self.prefetcher: CorrelationPrefetcher | None = None
        self._reader = None
        self._ring = None
        self._staged: list = []  # (ring slot, event) of staged reads whose copies may still be in flight
        self._streams: dict[torch.device, object] = {}
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        # the thread holds the queue, not the group, so a dropped group is collected (and closed by __del__)
        self._thread = threading.Thread(target=_run_jobs, args=(self._jobs,), name="klotski-experts-loader",
                                        daemon=True)
        self._thread.start()

    # ---- registration and budgets -----------------------------------------------------------------------
    def register(self, module, device_expert_bytes: int, host_expert_bytes: int, staging_bytes: int,
                 num_experts: int) -> tuple[int, int, int]:
        """Add ``module`` as the next layer -> (its layer index, device slots, host-resident experts).
        Raises BudgetError when one layer's share of ``gpu_memory`` holds no slot."""
        if len(self.modules) >= self.num_layers:
            raise ValueError(f"this group was made for {self.num_layers} layers; all have registered")
        if self.prefetcher is None:
            self.prefetcher = CorrelationPrefetcher(self.num_layers, num_experts)
            if self.prefetch_table is not None:
                self.prefetcher.load(self.prefetch_table)
        elif self.prefetcher.num_experts != num_experts:
            raise ValueError(f"{module.name}: {num_experts} experts, but this group's layers have "
                             f"{self.prefetcher.num_experts}")
        layer = len(self.modules)
        gpu_share = self.gpu.budget // self.num_layers if self.gpu.budget is not None else None
        slots = num_experts if gpu_share is None else min(num_experts, gpu_share // device_expert_bytes)
        if slots < 1:
            raise BudgetError(
                f"gpu memory budget {format_bytes(self.gpu.budget)} gives each of the {self.num_layers} MoE "
                f"layers {format_bytes(gpu_share)}, less than one expert slot ({format_bytes(device_expert_bytes)}); "
                f"at least {format_bytes(device_expert_bytes * self.num_layers)} is needed")
        self.gpu.hold(f"expert slots {module.name}", slots * device_expert_bytes)
        budget = self.cpu.budget
        if slots < num_experts and (budget is None or budget >= self.num_layers * num_experts * host_expert_bytes):
            host = num_experts  # every expert fits in host memory: no disk tier
        else:  # some experts are read from disk (once each when the device holds them all)
            if self._ring is None:
                self._make_ring(staging_bytes)
            elif self._ring.slot_bytes < staging_bytes:
                raise ValueError(f"{module.name}: experts need {staging_bytes} staging bytes, the group's ring "
                                 f"has {self._ring.slot_bytes}")
            share = max(0, budget - STAGING_SLOTS * self._ring.slot_bytes) if budget is not None else 0
            host = 0 if slots >= num_experts else min(num_experts, share // self.num_layers // host_expert_bytes)
        self.cpu.hold(f"host experts {module.name}", host * host_expert_bytes)
        self.modules.append(module)
        return layer, slots, host

    def _make_ring(self, staging_bytes: int) -> None:
        from klotski.io import DiskReader, PinnedRing

        self.cpu.hold("disk staging ring", STAGING_SLOTS * staging_bytes)
        self._ring = PinnedRing(STAGING_SLOTS, staging_bytes)
        self._reader = DiskReader(mode=self.io_mode, num_threads=1)

    def expert_order(self, layer: int, num_experts: int) -> list[int]:
        """Experts of ``layer`` hottest first by the prefetch table's popularity (ids in order without one)."""
        pop = self.prefetcher.popularity[layer] if self.prefetcher is not None else None
        if pop is None or pop.sum() == 0:
            return list(range(num_experts))
        return sorted(range(num_experts), key=lambda e: (-pop[e], e))

    # ---- routing observed: learn, prefetch the next layer ---------------------------------------------------
    def observe(self, layer: int, topk_ids_cpu: torch.Tensor) -> None:
        """Layer ``layer`` routed its tokens to ``topk_ids_cpu`` [T, k]: learn it and start the next layer's
        predicted loads."""
        pf = self.prefetcher
        pf.record(layer, topk_ids_cpu)
        nxt = layer + 1
        if not self.prefetch_enabled or nxt >= len(self.modules) or pf.popularity[nxt].sum() == 0:
            return
        self.modules[nxt].prefetch(pf.predict(nxt, topk_ids_cpu, budget=topk_ids_cpu.shape[1]))

    # ---- the loader thread -------------------------------------------------------------------------------
    def submit(self, fn, priority: int) -> Future:
        """Run ``fn()`` on the loader thread (``DEMAND`` jobs before ``PREFETCH`` ones, else in order)."""
        if self._closed:
            raise RuntimeError("this ExpertOffloadGroup is closed")
        fut: Future = Future()
        self._jobs.put((priority, next(self._seq), fn, fut))
        return fut

    def copy_stream(self, device: torch.device):
        """The side stream loads to ``device`` are issued on (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def staging_slot(self):
        """A staging ring slot for one disk read (loader thread only): the oldest staged slot is reused once
        the copy out of it has finished."""
        if len(self._staged) >= STAGING_SLOTS:
            slot, event = self._staged.pop(0)
            if event is not None:
                event.synchronize()
            slot.release()
        return self._ring.acquire(timeout=60.0)

    def staged(self, slot, event) -> None:
        """The copy out of ``slot`` was issued (``event`` marks its end on CUDA; None: already done)."""
        if event is None:
            slot.release()
        else:
            self._staged.append((slot, event))

    @property
    def reader(self):
        return self._reader

    # ---- reporting and shutdown --------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters summed over the layers (see :attr:`OffloadedExperts.stats`)."""
        out: dict = {}
        for m in self.modules:
            for k, v in m.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_stats(self) -> None:
        for m in self.modules:
            m.reset_stats()

    def close(self) -> None:
        """Stop the loader thread (after the job in progress) and close the disk reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put((-1, -1, None, None))
        if threading.current_thread() is not self._thread:  # (a group dropped by its own loader thread)
            self._thread.join()
        while not self._jobs.empty():  # jobs queued behind the stop: their waiters get an error
            _, _, fn, fut = self._jobs.get_nowait()
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("ExpertOffloadGroup closed before this load ran"))
        for slot, event in self._staged:
            if event is not None:
                event.synchronize()
            slot.release()
        self._staged.clear()
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "ExpertOffloadGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _run_jobs(jobs: queue.PriorityQueue) -> None:
    """The loader thread: run ``(priority, seq, fn, future)`` jobs until the stop entry (fn None)."""
    while True:
        _, _, fn, fut = jobs.get()
        if fn is None:
            return
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the forward that waits on it
            fut.set_exception(e)
