"""Where each weight lives once placed, and how one is copied into a device buffer.

:class:`PlacedWeights` holds, per layer, the device-resident tensors (norms and the classes placed on
"gpu"), host copies of the "cpu" classes (checkpoint dtype; pinned on CUDA) and the byte locations of the
"disk" classes; per routed expert its home: a permanent device pool slot, a host copy, or its bytes on disk.
Disk reads go through :class:`~klotski.runtime.disk_loads.DiskLoads`: one native call per record or tensor
(an O_DIRECT read into a slot of the staging ring, then the copies into the device tensors, widening
bf16 / fp16 to fp32 in CPU mode), the torch path for fp8 and other dtype pairs.
fp8 block-scaled weights stay fp8 + scales on the host and disk tiers (host copies are
:class:`~klotski.model.quant.Fp8Weight`; a disk piece's scale is read beside it, a store record holds its
scales): the fp8 bytes and scales cross the link and are dequantized into the device buffer
(:meth:`PlacedWeights.copy`), exactly as the resident engine dequantizes them at load.
int4 stores (``store.int4``): every routed expert comes from the store as stored (codes + scales + zero
points) on every tier, device pool slots included (an int4 :class:`~klotski.runtime.pool.ExpertPool`); the
kernels compute from them directly.
Bytes moved are counted per link in ``counters`` (``disk_read``, ``h2d``, ``d2h``).
"""
from __future__ import annotations

import threading

import torch

from klotski.checkpoint import TensorInfo
from klotski.io import span_bytes
from klotski.model.names import KEEP_FP32
from klotski.model.quant import Fp8Weight
from klotski.model.weights import CheckpointWeights
from klotski.quant.int4 import Int4Weight
from klotski.runtime.disk_loads import DiskLoads
from klotski.runtime.memory import TierMeter, nbytes
from klotski.runtime.placement import Layout, tensor_class
from klotski.runtime.pool import ExpertPool


class Counters:
    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> None:
        with self._lock:
            self.values[key] = self.values.get(key, 0) + int(amount)

    def reset(self) -> None:
        with self._lock:
            self.values.clear()

    def get(self, key: str) -> int:
        return self.values.get(key, 0)


class PlacedWeights:
    def __init__(self, weights: CheckpointWeights, layout: Layout, device: torch.device, dtype: torch.dtype,
                 gpu: TierMeter, cpu: TierMeter, expert_order: list[list[int]] | None = None, ring_slots: int = 2,
                 store=None, load_path: str | None = None, load_engine: str | None = None):
        self.weights, self.spec, self.layout = weights, weights.spec, layout
        self.device, self.dtype = device, dtype
        self.cuda = device.type == "cuda"
        self.counters = Counters()
        p = layout.placement
        to_dev = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        g = weights.read_global()
        self.embed = to_dev(g["embed"])
        self.norm = to_dev(g["norm"])
        self.lm_head = to_dev(g["lm_head"]) if "lm_head" in g else self.embed
        gpu.hold("embeddings+lm_head", sum(nbytes(t) for t in {id(x): x for x in (self.embed, self.norm, self.lm_head)}.values()))
        self.resident: list[dict[str, torch.Tensor]] = []
        self.host: list[dict[str, torch.Tensor]] = []
        self.disk: list[dict[str, list[TensorInfo]]] = []
        self.shapes: list[dict[str, tuple[int, ...]]] = []
        pieces = []
        for i, sources in enumerate(weights.layers):
            res, host, disk, shapes = {}, {}, {}, {}
            for key, src in sources.items():
                cls = tensor_class(key)
                tier = "gpu" if cls == "norm" else getattr(p, cls)
                shape = (sum(s[0] for s in src.shapes), *src.shapes[0][1:])
                if tier == "gpu":
                    t = weights.read_source(src, self.buffer_dtype(key))
                    res[key] = t.to(device=device, dtype=torch.float32) if key in KEEP_FP32 else to_dev(t)
                    gpu.hold(f"resident {cls}", nbytes(res[key]))
                elif tier == "cpu":
                    host[key] = self._pin(weights.read_source_stored(src))
                    cpu.hold(f"host {cls}", nbytes(host[key]))
                else:
                    disk[key] = [weights.info(n) for n in src.names]
                    if any(i.int4 is not None for i in disk[key]):  # no raw bytes: its dequantized copy is read
                        raise ValueError(f"layer {i} {key}: a 4-bit quantized layer streamed from disk needs the "
                                         f"int4 store's dequantized copy (open_int4_store) first")
                    pieces += disk[key]
                if tier != "gpu":
                    shapes[key] = shape
            self.resident.append(res)
            self.host.append(host)
            self.disk.append(disk)
            self.shapes.append(shapes)
        # routed experts
        spec = self.spec
        E = spec.num_experts if spec.moe_layers else 0
        n_gpu, n_cpu = p.experts_on("gpu", E) if E else 0, p.experts_on("cpu", E) if E else 0
        n_moe = len(spec.moe_layers)
        int4 = store.int4 if store is not None else None
        self.pool = ExpertPool(n_moe * n_gpu + layout.expert_slots, n_moe * n_gpu, spec.moe_intermediate_size,
                               spec.hidden_size, dtype, device, int4=int4) if E else None
        if self.pool is not None:
            gpu.hold("expert pool", self.pool.nbytes)
        self.expert_home: dict[tuple[int, int], tuple[str, object]] = {}
        slot = 0
        for layer in spec.moe_layers:
            order = expert_order[layer] if expert_order else list(range(E))
            for rank, e in enumerate(order):
                if rank < n_gpu:
                    w13, w2 = store.read_expert(layer, e, verify=True) if int4 else weights.read_expert(layer, e, dtype)
                    self.pool.w13[slot].copy_(w13)
                    self.pool.w2[slot].copy_(w2)
                    self.expert_home[(layer, e)] = ("gpu", slot)
                    slot += 1
                elif rank < n_gpu + n_cpu:
                    w13, w2 = store.read_expert(layer, e, verify=True) if int4 else weights.read_expert_stored(layer, e)
                    w13, w2 = self._pin(w13), self._pin(w2)
                    cpu.hold("host experts", nbytes(w13) + nbytes(w2))
                    self.expert_home[(layer, e)] = ("cpu", (w13, w2))
                elif store is not None:
                    self.expert_home[(layer, e)] = ("store", store.expert(layer, e))
                else:
                    w13_pieces, w2_info = weights.expert_pieces(layer, e)
                    self.expert_home[(layer, e)] = ("disk", (w13_pieces, w2_info))
                    pieces += [*w13_pieces, w2_info]
        # staging for disk reads
        self.disk_loads = None
        self.store = store
        records = [w for t, w in self.expert_home.values() if t == "store"]
        if pieces or records:
            slot_bytes = max([span_bytes(x.offset, x.nbytes) for x in pieces]
                             + [span_bytes(r.offset, r.nbytes) for r in records])
            self.disk_loads = DiskLoads(device, slot_bytes, ring_slots, self.counters, store=store,
                                        scale_reader=self._fp8_piece, path=load_path, engine=load_engine)
            cpu.hold("disk staging ring", ring_slots * self.disk_loads.ring.slot_capacity)

    def _fp8_piece(self, info: TensorInfo, src: torch.Tensor) -> Fp8Weight:
        """An fp8 piece read into the staging ring, with its block scales read beside it."""
        scale = self.weights.index.read(info.scale_inv).float()
        return Fp8Weight(src, scale, (info.shape[0],), self.weights.block)

    def _pin(self, t):
        return t.pin_memory() if self.cuda else t

    # ---- copies ----------------------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, src: "torch.Tensor | Fp8Weight") -> None:
        """Host ``src`` (a tensor, or fp8 + scales) into device ``dst`` in ``dst``'s dtype. fp8: the fp8 bytes
        and scales are copied to the device (a transient of the fp8 bytes) and dequantized there, so the link
        carries 1 byte per weight; the values are the resident engine's (:func:`dequantize_fp8_block`)."""
        if isinstance(src, Int4Weight):  # int4 store: codes + scales cross the link and stay as they are
            dst.copy_(src, non_blocking=self.cuda)
        elif isinstance(src, Fp8Weight):
            if self.cuda:
                src = Fp8Weight(src.weight.to(dst.device, non_blocking=True),
                                src.scale_inv.to(dst.device, non_blocking=True), src.rows, src.block)
            src.dequantize(out=dst.view(tuple(src.shape)))
        else:
            dst.copy_(src.view(dst.shape), non_blocking=self.cuda)

    def fill(self, dst: torch.Tensor, src) -> int:
        """Copy a host tensor / Fp8Weight, or disk pieces concatenated along dim 0, into ``dst`` (device).
        -> bytes moved (fp8: weight + scale bytes)."""
        if not isinstance(src, list):
            self.copy(dst, src)
            self.counters.add("h2d", nbytes(src))
            return nbytes(src)
        row, total = 0, 0
        for info in src:
            rows = info.shape[0]
            self._read_piece(info, dst[row : row + rows])
            row += rows
            total += info.stored_nbytes
        return total

    def _read_piece(self, info: TensorInfo, dst: torch.Tensor) -> None:
        self.disk_loads.read_piece(self.copy, info, dst)

    def read_record(self, rec, w13: torch.Tensor, w2: torch.Tensor) -> int:
        """One packed-store expert record (one read) into device ``w13`` / ``w2``
        (:meth:`DiskLoads.read_record`: one native call where it applies)."""
        return self.disk_loads.read_record(self.copy, rec, w13, w2)

    def read_expert_host(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A disk-tier expert (packed-store record or checkpoint pieces) read into new host tensors w13 [2I, H],
        w2 [H, I] in the compute dtype, for the CPU to compute from (fp8 dequantized as a load would)
        -> (w13, w2, bytes read)."""
        tier, what = self.expert_home[(layer, e)]
        I, H = self.spec.moe_intermediate_size, self.spec.hidden_size
        w13 = torch.empty((2 * I, H), dtype=self.dtype)
        w2 = torch.empty((H, I), dtype=self.dtype)
        if tier == "store":
            if self.store.int4 is not None:
                raise RuntimeError(f"layer {layer} expert {e}: an int4 store's experts are not computed on the CPU")
            read = self.disk_loads.read_record(self.copy, what, w13, w2, to_device=False)
        elif tier == "disk":
            pieces, w2_info = what
            row = 0
            for info in pieces:
                self.disk_loads.read_piece(self.copy, info, w13[row: row + info.shape[0]], to_device=False)
                row += info.shape[0]
            self.disk_loads.read_piece(self.copy, w2_info, w2, to_device=False)
            read = sum(info.stored_nbytes for info in (*pieces, w2_info))
        else:
            raise RuntimeError(f"layer {layer} expert {e} is on {tier}, not on disk")
        return w13, w2, read

    def take_read_seconds(self) -> float:
        """Seconds this thread waited on disk reads since the last call (0 without a disk tier)."""
        return self.disk_loads.take_read_seconds() if self.disk_loads is not None else 0.0

    def streamed_keys(self, layer: int) -> dict[str, tuple[int, ...]]:
        return self.shapes[layer]

    def buffer_dtype(self, key: str) -> torch.dtype:
        """The device dtype of a streamed weight: the compute dtype, fp32 for ``KEEP_FP32`` names (the
        DeepSeek-V3 router bias must not be rounded, as in the resident engine)."""
        return torch.float32 if key in KEEP_FP32 else self.dtype

    def source(self, layer: int, key: str):
        return self.host[layer].get(key) if key in self.host[layer] else self.disk[layer][key]

    def host_experts_plain(self) -> bool:
        """Whether every host-resident expert is a plain tensor pair (CPU expert compute reads them in place;
        fp8 / int4 host copies are not computed from on the CPU) and no disk-tier one is int4 (a disk-tier
        expert computed on the CPU is read into compute-dtype host tensors)."""
        return (all(isinstance(what[0], torch.Tensor) and type(what[0]) is torch.Tensor
                    for tier, what in self.expert_home.values() if tier == "cpu")
                and not (self.store is not None and self.store.int4 is not None))

    def expert_tier(self, layer: int, e: int) -> str:
        return self.expert_home[(layer, e)][0]

    def close(self) -> None:
        if self.disk_loads is not None:
            self.disk_loads.close()
            self.disk_loads = None
        if self.store is not None:
            self.store.close()  # releases the offload directory's shared lock

    def tier_bytes(self) -> dict:
        """Weight bytes per tier as placed (for reports)."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for res, host, disk in zip(self.resident, self.host, self.disk):
            out["gpu"] += sum(nbytes(t) for t in res.values())
            out["cpu"] += sum(nbytes(t) for t in host.values())
            out["disk"] += sum(i.stored_nbytes for infos in disk.values() for i in infos)
        for tier, what in self.expert_home.values():
            if tier == "cpu":
                out["cpu"] += nbytes(what[0]) + nbytes(what[1])
            elif tier == "disk":
                out["disk"] += sum(i.stored_nbytes for i in what[0]) + what[1].stored_nbytes
            elif tier == "store":
                out["disk"] += what.nbytes
        if self.pool is not None:
            out["gpu"] += self.pool.num_pinned * (self.pool.nbytes // max(self.pool.num_slots, 1))
        return out

