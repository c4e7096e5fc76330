"""Predicted routed-expert phase of one MoE layer on G devices: FSE-DP vs expert parallelism vs replicated
offloading, with every expert streamed from host memory (each device has its own host link).

All three keep attention data parallel (each device its own sequences), so they differ only in the routed
experts, which is what is predicted here: the seconds from the layer's routing to its routed outputs being
complete on every device, the bytes over the host links and over the device-to-device links.

- **replicated**: each device streams every expert its own tokens need over its own host link and computes its
  tokens: an expert needed on G devices crosses G host links.
- **expert parallelism**: expert e lives on device e mod G, which streams it once and computes every token routed
  to it; tokens travel there and back (all-to-all of hidden states: the dispatch overlaps the first loads, the
  combine follows the last compute). A hot expert's device does its tokens for all devices.
- **fse-dp**: the schedule of :func:`klotski.distributed.schedule.plan_layer` executed round by round as the
  runtime does (loads for round t + 1 issued at the start of round t on the host link; the round's computes of
  slices that go on, then its sends and receives, overlapping the computes of slices whose path ends there; all
  waited at the end of the round), one load and one send lane per device.

Streaming is sliced the same way in all three (``num_slices`` per expert, ``slots`` buffers per device: a load
waits for a free slot). Durations: a copy is ``transfer_latency_s + bytes / bandwidth``; a slice's compute over n
tokens ``max(flops / matmul rate, slice bytes / device memory bandwidth) + op_overhead_s``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klotski.distributed.schedule import interleave_heavy_light, plan_layer

STRATEGIES = ("fse-dp", "expert-parallel", "replicated")


@dataclass(frozen=True)
class StrategyPrediction:
    strategy: str
    step_s: float  # routed-expert phase of one MoE layer
    host_bytes: int  # over all host links
    host_bytes_per_device: tuple[int, ...]
    d2d_bytes: int  # over all device-to-device links


@dataclass(frozen=True)
class LayerShape:
    """What the prediction needs of the model: one expert's bytes and parameters, the hidden size, dtypes."""

    expert_bytes: int  # w13 + w2 of one routed expert, as stored / streamed
    expert_params: int  # matmul FLOPs per token = 2 * expert_params
    hidden_size: int
    act_bytes: float  # bytes per activation element (the all-to-all of expert parallelism)
    dtype: str  # matmul rate lookup

    @classmethod
    def from_costs(cls, costs, layer: int | None = None) -> "LayerShape":
        """From :class:`klotski.costs.ModelCosts` (``layer``: an MoE layer; default the first one)."""
        moe = [lc for lc in costs.layers if lc.kind == "moe"]
        if not moe:
            raise ValueError(f"{costs.name}: no MoE layer to predict")
        lc = moe[0] if layer is None else costs.layers[layer]
        return cls(lc.expert_bytes, lc.expert_params, costs.spec.hidden_size, costs.act_bytes, costs.act_dtype)


def sample_counts(popularity, devices: int, tokens_per_device: int, top_k: int, seed: int = 0) -> list[list[int]]:
    """[devices][experts] token-expert pairs: each token picks ``top_k`` distinct experts with probabilities
    proportional to ``popularity`` [E] (e.g. Zipf: ``1 / rank**s``)."""
    p = np.asarray(popularity, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or p.sum() <= 0 or not 1 <= top_k <= (p > 0).sum():
        raise ValueError(f"popularity must be [E] >= 0 with at least top_k={top_k} positive entries, got {p}")
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore"):
        logp = np.log(p / p.sum())
    counts = np.zeros((devices, p.size), dtype=np.int64)
    for d in range(devices):
        # Gumbel top-k: the k largest of log p + Gumbel noise are k draws without replacement, proportional to p
        keys = logp[None, :] + rng.gumbel(size=(tokens_per_device, p.size))
        picks = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        counts[d] = np.bincount(picks.reshape(-1), minlength=p.size)
    return counts.tolist()


def zipf_popularity(num_experts: int, s: float = 1.2) -> list[float]:
    return [1.0 / (r + 1) ** s for r in range(num_experts)]


class _Rates:
    def __init__(self, shape: LayerShape, hw, num_slices: int):
        if hw.d2d_bandwidth <= 0:
            raise ValueError(f"hardware profile {hw.name!r} has no device-to-device bandwidth (d2d_bandwidth): "
                             f"use a preset (e.g. --hardware h100) or set d2d_bandwidth in the profile JSON")
        self.hw, self.shape, self.num_slices = hw, shape, num_slices
        self.slice_bytes = shape.expert_bytes / num_slices
        self.rate = hw.matmul_rate(shape.dtype)

    def load(self) -> float:
        return self.hw.transfer_latency_s + self.slice_bytes / self.hw.h2d_bandwidth

    def send(self, nbytes: float | None = None) -> float:
        return self.hw.transfer_latency_s + (self.slice_bytes if nbytes is None else nbytes) / self.hw.d2d_bandwidth

    def compute(self, tokens: int) -> float:
        if tokens == 0:
            return 0.0
        flops = 2.0 * tokens * self.shape.expert_params / self.num_slices
        return max(flops / self.rate, self.slice_bytes / self.hw.device_mem_bandwidth) + self.hw.op_overhead_s


def _stream(rates: _Rates, work: list[int], slots: int, inputs_at: float = 0.0) -> float:
    """One device streaming slices over its host link into ``slots`` buffers and computing them in order:
    ``work`` = tokens per slice (in order); computes start once the tokens are there (``inputs_at``)
    -> seconds until the last compute ends."""
    load_end, comp_end = [], []
    link, comp = 0.0, inputs_at
    for j, tokens in enumerate(work):
        slot_free = comp_end[j - slots] if j >= slots else 0.0
        link = max(link, slot_free) + rates.load()
        load_end.append(link)
        comp = max(comp, link) + rates.compute(tokens)
        comp_end.append(comp)
    return comp


def _replicated(counts, rates: _Rates, slots: int) -> StrategyPrediction:
    G = len(counts)
    times, per_dev = [], []
    for d in range(G):
        order = interleave_heavy_light(list(counts[d]))
        times.append(_stream(rates, [counts[d][e] for e in order for _ in range(rates.num_slices)], slots))
        per_dev.append(len(order) * rates.shape.expert_bytes)
    return StrategyPrediction("replicated", max(times, default=0.0), sum(per_dev), tuple(per_dev), 0)


def _expert_parallel(counts, rates: _Rates, slots: int) -> StrategyPrediction:
    G, E = len(counts), len(counts[0])
    totals = [sum(counts[d][e] for d in range(G)) for e in range(E)]
    row = rates.shape.hidden_size * rates.shape.act_bytes
    out_b, in_b = [0.0] * G, [0.0] * G  # dispatch bytes leaving / reaching each device (combine: the reverse)
    for e in range(E):
        owner = e % G
        for d in range(G):
            if d != owner:
                out_b[d] += counts[d][e] * row
                in_b[owner] += counts[d][e] * row
    heaviest = max(max(out_b, default=0.0), max(in_b, default=0.0))
    a2a = rates.send(heaviest) if heaviest > 0 else 0.0
    times, per_dev = [], []
    for d in range(G):
        owned = [e if e % G == d else -1 for e in range(E)]
        order = interleave_heavy_light([totals[e] if owned[e] >= 0 else 0 for e in range(E)])
        times.append(_stream(rates, [totals[e] for e in order for _ in range(rates.num_slices)], slots, a2a))
        per_dev.append(len(order) * rates.shape.expert_bytes)
    step = max(times, default=0.0) + a2a  # dispatch overlaps the first loads; the combine follows the computes
    return StrategyPrediction("expert-parallel", step, sum(per_dev), tuple(per_dev), int(2 * sum(out_b)))


def _fse_dp(counts, rates: _Rates, slots: int, loader: str) -> StrategyPrediction:
    G = len(counts)
    sched = plan_layer(counts, rates.num_slices, slots, loader)
    rounds = [{ops.round: ops for ops in sched.rank_rounds(r)} for r in range(G)]
    round_end = [0.0] * G
    host_free = [0.0] * G
    send_free = [0.0] * G
    ready: dict[tuple, float] = {}  # (expert, slice, rank) -> slice in the rank's slot
    loads = [0] * G
    sends = 0
    for t in range(-1, sched.num_rounds):
        post = list(round_end)  # when each rank posts the round's sends and receives
        computed = list(round_end)  # when each rank's computes of the round end
        for r in range(G):
            ops = rounds[r].get(t)
            if ops is None:
                continue
            for task in ops.loads:
                host_free[r] = max(host_free[r], round_end[r]) + rates.load()
                ready[(task.expert, task.slice, r)] = host_free[r]
                loads[r] += 1
            onward = {(task.expert, task.slice) for task, _ in ops.sends}
            first = [task for task in ops.computes if (task.expert, task.slice) in onward]
            last = [task for task in ops.computes if (task.expert, task.slice) not in onward]
            clock = round_end[r]
            for i, task in enumerate(first + last):
                if i == len(first):
                    post[r] = clock  # the sends are posted once the slices that go on are computed
                clock = max(clock, ready[(task.expert, task.slice, r)]) + rates.compute(counts[r][task.expert])
            if not last:
                post[r] = clock
            computed[r] = clock
        end = list(computed)
        for r in range(G):
            ops = rounds[r].get(t)
            for task, dst in ops.sends if ops is not None else ():
                start = max(post[r], post[dst], send_free[r])
                send_free[r] = start + rates.send()
                ready[(task.expert, task.slice, dst)] = send_free[r]
                end[r] = max(end[r], send_free[r])
                end[dst] = max(end[dst], send_free[r])
                sends += 1
        round_end = end
    per_dev = tuple(int(n * rates.slice_bytes) for n in loads)
    return StrategyPrediction("fse-dp", max(round_end, default=0.0), sum(per_dev), per_dev,
                              int(sends * rates.slice_bytes))


def predict_layer(counts, shape: LayerShape, hw, num_slices: int = 4, slots: int = 4,
                  loader: str = "balanced") -> dict[str, StrategyPrediction]:
    """``counts`` [devices][experts] token-expert pairs of one MoE layer -> {strategy: prediction}
    (:data:`STRATEGIES`)."""
    counts = [list(map(int, row)) for row in counts]
    if not counts or not counts[0]:
        raise ValueError("counts must be [devices][experts] with at least one device and one expert")
    rates = _Rates(shape, hw, num_slices)
    return {"fse-dp": _fse_dp(counts, rates, slots, loader),
            "expert-parallel": _expert_parallel(counts, rates, slots),
            "replicated": _replicated(counts, rates, slots)}
