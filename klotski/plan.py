"""What the planner returns: a :class:`Plan` (the choices, the placement and their predicted figures) or an
:class:`InfeasibleError` naming the smallest memory that would fit."""
from __future__ import annotations

from dataclasses import dataclass, field

from klotski.program.host import HostCompute
from klotski.schedule import TIERS, Placement
from klotski.units import format_bytes


RATE_TIE = 1e-9  # relative difference of predicted tokens/s below which two plans tie


class InfeasibleError(ValueError):
    """No plan fits the memory limits; ``min_gpu_memory`` / ``min_cpu_memory`` say what would."""

    def __init__(self, message: str, min_gpu_memory: int = 0, min_cpu_memory: int = 0):
        super().__init__(message)
        self.min_gpu_memory, self.min_cpu_memory = min_gpu_memory, min_cpu_memory


@dataclass
class Plan:
    policy: str
    placement: Placement
    batch_size: int
    n: int
    prompt_len: int
    gen_len: int
    tokens_per_s: float
    prefill_s: float
    decode_step_s: float
    bubble_fraction: float  # idle share of the compute stream over the whole run
    peak_mem: dict  # tier -> bytes
    bytes_per_step: dict  # link -> bytes moved in one decode step
    num_hot: int | None = None
    overlap: bool = True
    dense_buffers: int = 2  # the runtime's pools the plan was simulated with (klotski.program.pools)
    expert_slots: int = 0
    hardware: str = ""
    model: str = ""
    extra: dict = field(default_factory=dict)
    host: HostCompute = field(default_factory=HostCompute)  # attention per phase / cold experts on the CPU

    @property
    def total_s(self) -> float:
        return self.prefill_s + (self.gen_len - 1) * self.decode_step_s

    def beats(self, other: "Plan | None") -> bool:
        """Whether this plan is predicted faster than ``other`` (None: nothing to beat). Rates within
        :data:`RATE_TIE` of each other are a tie, which the searches keep in their own order: a plan found earlier
        is not replaced by one that the rounding of a different simulation (a window extrapolated or not) puts
        1e-15 ahead."""
        return other is None or self.tokens_per_s > other.tokens_per_s * (1 + RATE_TIE)

    def describe(self, num_experts: int) -> str:
        lines = [
            f"policy      {self.policy}" + (f" (prefetch {self.num_hot} hot expert{'s' * (self.num_hot != 1)})"
                                            if self.num_hot else
                                            " (no hot prefetch: experts load after the gates)"
                                            if self.num_hot == 0 else
                                            " (FlexGen order chosen)" if self.policy == "klotski" else ""),
            f"batch       {self.batch_size} sequences x n={self.n} batches per group "
            f"= {self.batch_size * self.n} sequences",
            f"placement   {self.placement.describe(num_experts)}",
            *([f"prefill     in {-(-self.prompt_len // self.placement.prefill_chunk)} passes of "
               f"{self.placement.prefill_chunk} columns (the whole prompt's activations do not fit the device)"]
              if self.placement.prefill_chunk else []),
            f"predicted   {self.tokens_per_s:.2f} tokens/s (prefill {self.prefill_s:.2f} s, decode step "
            f"{self.decode_step_s * 1e3:.1f} ms, total {self.total_s:.1f} s), compute bubble "
            f"{self.bubble_fraction:.1%}",
            f"host        {self.host.describe()}"
            + (f" (an expert of {self.model or 'this model'} runs on the CPU up to "
               f"{self.extra['cpu_expert_max_tokens']} tokens)" if "cpu_expert_max_tokens" in self.extra else ""),
            "peak memory " + ", ".join(f"{t} {format_bytes(self.peak_mem.get(t, 0))}" for t in TIERS),
            "per decode step " + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.bytes_per_step.items()))
            if self.bytes_per_step else "per decode step: no transfers",
        ]
        return "\n".join(lines)
