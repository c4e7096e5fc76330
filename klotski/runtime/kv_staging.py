"""KV staging: a micro-batch's KV layer copied from host memory into a device staging buffer and back.

Used when the batch group's KV cache lives in host memory (:class:`~klotski.runtime.cache.GroupCache` with
``tier == "cpu"``), FlexGen-style: before a micro-batch's attention its layer's filled KV columns are copied
into one of the device staging buffers on the ``kv_load`` lane, granted in load order (as many as the op order
assumes: :func:`klotski.program.pools.kv_staging_buffers`; with two, the next micro-batch's layer loads while
this one computes); after the attention the columns the step appended are copied back on
the ``kv_store`` lane, and the staging buffer is released once they have landed.
"""
from __future__ import annotations

import torch

from klotski.model.kv_cache import KVCache
from klotski.runtime.loader import Lanes, Ticket
from klotski.runtime.loads import begin_load, compute_event
from klotski.runtime.memory import TierMeter, nbytes
from klotski.runtime.pool import SlotPool
from klotski.runtime.trace import Tracer
from klotski.runtime.weights import PlacedWeights

SEQ_DIM = -2  # the sequence (capacity) dim of every KV cache tensor: [B, kv_heads, cap, D] / MLA [B, cap, r]


class KVStaging:
    def __init__(self, spec, w: PlacedWeights, lanes: Lanes, tracer: Tracer, gpu: TierMeter, device: torch.device,
                 timeout_s: float | None, buffers: int = 2):
        if buffers < 2:  # the op order loads the next micro-batch's KV during this one's attention
            raise ValueError(f"KV staging needs at least two buffers, got {buffers}")
        self.spec, self.w, self.lanes, self.tracer, self.gpu, self.device = spec, w, lanes, tracer, gpu, device
        self.cuda = device.type == "cuda"
        self.pool = SlotPool(list(range(buffers)), "kv staging", timeout_s)
        self.bufs: list[dict[str, torch.Tensor]] = [{} for _ in range(buffers)]

    def load(self, st, layer: int, k: int, op_ids: tuple = ()) -> Ticket:
        """Micro-batch ``k``'s KV of ``layer`` into a device staging buffer -> (buffer, KVCache view)."""
        cache = st.cache
        ticket = self.pool.reserve()
        rows = cache.rows[k][1] - cache.rows[k][0]

        def job(ln):
            self.tracer.log_ops("kv_load", op_ids)
            idx, start = begin_load(self.pool, ticket, ln, self.tracer, self.w)
            view = KVCache(self.spec.num_layers, rows, cache.capacity, cache.device_pads[k])
            view.length = cache.length
            moved = 0
            filled = cache.length  # columns written by earlier steps; this step appends after them
            for name, host in cache.micro[k].layers[layer].items():
                buf = self.bufs[idx].get(name)
                if buf is None or buf.shape[1:] != host.shape[1:] or buf.shape[0] < rows:
                    shape = (max(host.shape[0], -(-cache.batch_size // cache.num_batches)), *host.shape[1:])
                    if buf is not None:
                        self.gpu.free("kv staging", nbytes(buf))
                    buf = torch.empty(shape, dtype=host.dtype, device=self.device)
                    self.gpu.hold("kv staging", nbytes(buf), check=False)
                    self.bufs[idx][name] = buf
                view.layers[layer][name] = buf[:rows]
                src = host.narrow(SEQ_DIM, 0, filled)  # the filled columns only, not the whole capacity
                view.layers[layer][name].narrow(SEQ_DIM, 0, filled).copy_(src, non_blocking=self.cuda)
                moved += src.numel() * src.element_size()
            self.w.counters.add("kv_h2d", moved)
            self.tracer.end("kv_load", f"L{layer} b{k} kv", start, ln.stream, bytes=moved)
            return idx, view

        return self.lanes["kv_load"].submit(f"L{layer} b{k} kv load", job)

    def store(self, st, layer: int, k: int, idx: int, view: KVCache, op_ids: tuple = ()) -> Ticket:
        """The columns this step appended to micro-batch ``k``'s layer, back into host memory; frees buffer
        ``idx`` once they have landed."""
        cache = st.cache
        after = compute_event(self.cuda)
        first, count = cache.length, st.S  # the columns this step appended

        def job(ln):
            self.tracer.log_ops("kv_store", op_ids)
            if after is not None:
                ln.stream.wait_event(after)
            start = self.tracer.begin(ln.stream)
            moved = 0
            home = cache.micro[k].layers[layer]
            for name, t in view.layers[layer].items():
                if name not in home:
                    home[name] = torch.zeros(t.shape, dtype=t.dtype, pin_memory=self.cuda)
                new = t.narrow(SEQ_DIM, first, count)
                home[name].narrow(SEQ_DIM, first, count).copy_(new, non_blocking=self.cuda)
                moved += new.numel() * new.element_size()
            done = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record(ln.stream)
                done.synchronize()
            self.w.counters.add("kv_d2h", moved)
            self.tracer.end("kv_store", f"L{layer} b{k} kv", start, ln.stream, bytes=moved)
            self.pool.release(idx, done)

        return self.lanes["kv_store"].submit(f"L{layer} b{k} kv store", job)
