"""Compute on the host: where attention runs per phase, and the rule that computes a cold expert on the CPU.

Two placements, both read by the op builders (so the simulator prices and the runtime runs the same ops):

* **attention** per phase (``prefill`` / ``decode``): ``gpu`` (the device computes attention over its KV, or
  over a KV staged in from host memory) or ``cpu``: the device computes the Q/K/V projections, they cross the
  link, the CPU runs attention over the KV cache where it lives in host memory (appending the step's
  columns there: no KV load or store), and the output crosses back for the output projection. CPU attention
  needs the KV cache in host memory; with the KV on the device a step runs attention there.
* **cold experts** (routed experts in pinned host memory or on disk, selected by a step and not GPU-resident
  or prefetched): ``off`` (always loaded), ``auto`` (per step and per expert, :class:`ExpertRule` from the
  token count the gates gave it) or ``all`` (every cold expert on the CPU: tests and ablations). A host-tier
  expert is computed with its weights in place; a disk-tier one is read into host memory on the CPU lane and
  computed there instead of being copied on to the device. The read is the same either way, so one rule
  decides for both tiers.

:class:`ExpertRule` is Fiddler's decision (arXiv 2402.07033) with the cost model's times on one hardware
profile: expert ``e`` with ``t`` tokens runs on the CPU iff

    cpu_seconds(t) < load_seconds + gpu_seconds(t)

where ``cpu_seconds`` reads the weights in place in host memory (``op_seconds`` of the expert op on the CPU,
plus the hidden rows crossing to the host and the outputs back), ``load_seconds`` is the copy of the expert
over the link and ``gpu_seconds`` the expert op on the device. With a constant CPU time per token and a
free GPU this is Fiddler's ``t x cpu_time_per_token < load_time``. The CPU's side grows faster in ``t`` than
the device's, so the choice is monotone: the CPU wins up to a threshold (:meth:`ExpertRule.max_cpu_tokens`).

Torch-free (the planner imports it).
"""
from __future__ import annotations

from dataclasses import dataclass

from klotski.costs import op_seconds

ATTN_DEVICES = ("gpu", "cpu")
EXPERT_MODES = ("off", "auto", "all")


@dataclass(frozen=True)
class HostCompute:
    """Where a plan computes on the host: attention per phase, and the cold-expert mode."""

    prefill_attn: str = "gpu"
    decode_attn: str = "gpu"
    experts: str = "off"

    def __post_init__(self):
        for name in ("prefill_attn", "decode_attn"):
            if getattr(self, name) not in ATTN_DEVICES:
                raise ValueError(f"HostCompute.{name} must be one of {ATTN_DEVICES}, got {getattr(self, name)!r}")
        if self.experts not in EXPERT_MODES:
            raise ValueError(f"HostCompute.experts must be one of {EXPERT_MODES}, got {self.experts!r}")

    def attn(self, phase: str) -> str:
        """Where attention of a ``phase`` ("prefill" | "decode") step runs."""
        return self.prefill_attn if phase == "prefill" else self.decode_attn

    @property
    def any_cpu_attn(self) -> bool:
        return "cpu" in (self.prefill_attn, self.decode_attn)

    def describe(self) -> str:
        return f"attention prefill={self.prefill_attn} decode={self.decode_attn}, cold experts on cpu={self.experts}"


HOST_CHOICES = ("auto", "off")  # the planner's choice (a search on CUDA) / everything on the device


def parse_host_compute(value) -> "str | HostCompute":
    """What ``LLM(host_compute=...)`` and ``--host-compute`` accept -> "auto", "off" or a fixed
    :class:`HostCompute`: a HostCompute, "auto", "off", or comma-separated ``key=value`` settings of a fixed
    one, keys ``prefill`` / ``decode`` (attention: gpu | cpu) and ``experts`` (off | auto | all), the unnamed
    ones as in ``HostCompute()``: e.g. "decode=cpu" or "prefill=cpu,decode=cpu,experts=all"."""
    if isinstance(value, HostCompute):
        return value
    if not isinstance(value, str):
        raise ValueError(f"host_compute must be 'auto', 'off', 'key=value,...' settings or a HostCompute, got "
                         f"{type(value).__name__} {value!r}")
    text = value.strip().lower()
    if text in HOST_CHOICES:
        return text
    keys = {"prefill": "prefill_attn", "decode": "decode_attn", "experts": "experts"}
    fields = {}
    for item in text.split(","):
        key, sep, setting = (part.strip() for part in item.partition("="))
        if not sep or key not in keys or keys[key] in fields:
            raise ValueError(f"host_compute {value!r}: expected 'auto', 'off' or settings like "
                             f"'prefill=gpu,decode=cpu,experts=auto' (keys {sorted(keys)}, each once); "
                             f"could not read {item.strip()!r}")
        fields[keys[key]] = setting
    return HostCompute(**fields)  # checks each setting


def attention_seconds(costs, hw, seqs: int, past_len: int, device: str, layer: int = 0) -> float:
    """One layer's decode attention for ``seqs`` sequences over ``past_len`` cached tokens with the KV cache in host
    memory, every op alone on its resource (nothing overlapped): on the ``gpu``, the KV copied in, attention on
    the device and the step's new columns copied out; on the ``cpu``, Q/K/V copied out, attention over the host
    KV on the CPU and its output copied back. The unpipelined side of the attention crossover (the simulator's
    roofline is the perfectly overlapped side)."""
    from klotski.schedule import Op

    if device not in ATTN_DEVICES:
        raise ValueError(f"attention_seconds: device must be one of {ATTN_DEVICES}, got {device!r}")
    dtype = costs.act_dtype
    kv_per_token = costs.layers[layer].kv_bytes_per_token
    _, score, kv_read = costs.attn_flops(layer, seqs, 1, past_len)

    def copy(link: str, nbytes: int) -> float:
        return op_seconds(Op(0, "h2d", "x", "gpu", layer, link=link, bytes=int(nbytes)), hw, dtype)

    attn = op_seconds(Op(0, "attn", "compute", device, layer, score_flops=score, bytes=kv_read), hw, dtype)
    if device == "gpu":
        return copy("h2d", seqs * past_len * kv_per_token) + attn + copy("d2h", seqs * kv_per_token)
    _, _, up, down = costs.attn_host_split(layer, seqs)
    return copy("d2h", up) + attn + copy("h2d", down)


def fiddler_rule(tokens: int, cpu_s_per_token: float, load_s: float, gpu_s: float = 0.0,
                 cpu_fixed_s: float = 0.0) -> bool:
    """Fiddler's published rule: compute on the CPU iff ``cpu_fixed_s + tokens x cpu_s_per_token < load_s +
    gpu_s`` (strict: a tie loads)."""
    return cpu_fixed_s + tokens * cpu_s_per_token < load_s + gpu_s


class ExpertRule:
    """The cold-expert decision on one hardware profile (see the module docstring); thresholds per layer are
    computed once. ``dtype``: the compute dtype whose rates apply (default: the costs' activation dtype)."""

    MAX_TOKENS = 1 << 24

    def __init__(self, costs, hw, dtype: str | None = None):
        self.costs, self.hw = costs, hw
        self.dtype = dtype or costs.act_dtype
        self._max: dict[int, int] = {}

    def _op(self, layer: int, tokens: int, device: str):
        from klotski.schedule import Op

        lc = self.costs.layers[layer]
        return Op(0, "expert", "compute", device, layer, tokens=tokens, bytes=lc.expert_bytes,
                  flops=self.costs.expert_flops(layer, tokens))

    def _copy(self, link: str, nbytes: int) -> float:
        from klotski.schedule import Op

        return op_seconds(Op(0, "h2d", "x", "gpu", 0, link=link, bytes=int(nbytes)), self.hw, self.dtype)

    def cpu_seconds(self, layer: int, tokens: int) -> float:
        """The expert over ``tokens`` tokens on the CPU with its weights in host memory, the hidden rows sent
        to the host and the fp32 outputs sent back."""
        rows = self.costs.hidden_bytes(tokens)
        return (op_seconds(self._op(layer, tokens, "cpu"), self.hw, self.dtype) + self._copy("d2h", rows)
                + self._copy("h2d", tokens * self.costs.spec.hidden_size * 4))

    def load_seconds(self, layer: int) -> float:
        """Copying the expert from host memory into a device slot."""
        return self._copy("h2d", self.costs.layers[layer].expert_bytes)

    def gpu_seconds(self, layer: int, tokens: int) -> float:
        return op_seconds(self._op(layer, tokens, "gpu"), self.hw, self.dtype)

    def cpu_wins(self, layer: int, tokens: int) -> bool:
        """Whether a cold expert of ``layer`` (in host memory, or read there from disk) with ``tokens`` tokens is
        cheaper on the CPU."""
        return tokens <= self.max_cpu_tokens(layer)

    def _cpu_cheaper(self, layer: int, tokens: int) -> bool:
        return self.cpu_seconds(layer, tokens) < self.load_seconds(layer) + self.gpu_seconds(layer, tokens)

    def max_cpu_tokens(self, layer: int) -> int:
        """The largest token count the CPU wins for (-1: not even an expert no token selected); the choice is
        monotone in the token count (binary search)."""
        if layer not in self._max:
            if not self._cpu_cheaper(layer, 0):
                self._max[layer] = -1
            elif self._cpu_cheaper(layer, self.MAX_TOKENS):
                self._max[layer] = self.MAX_TOKENS
            else:
                lo, hi = 0, self.MAX_TOKENS  # cheaper at lo, not at hi
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if self._cpu_cheaper(layer, mid) else (lo, mid)
                self._max[layer] = lo
        return self._max[layer]
