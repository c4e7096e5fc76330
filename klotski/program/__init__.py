"""One op builder per policy, two consumers: the simulator and the runtime execute the same ops.

:func:`step_ops` yields the ops of one step (prefill or decode) of a batch group in issue order, built by
the policy's builder (:mod:`.flexgen` for ``layerwise`` / ``flexgen`` / ``resident``, :mod:`.klotski`)
from a :class:`~klotski.program.context.StepContext` (the plan's fields and the step's shape) and a
:class:`~klotski.program.routing.RoutingView`. The simulator (:func:`klotski.schedule.build_schedule`)
collects them with the expected routing and times them; the runtime
(:class:`klotski.runtime.interpreter.StepInterpreter`) executes each op as it is yielded -- loads on their
lanes, compute and releases in order -- and feeds the routing its gates produce back through a live view,
so the expert ops after a gate are built from the routing that occurred. Nothing else orders the work.

Which order a plan runs in is decided in one place, :func:`order_of`: a klotski plan without a prefetch
width (``num_hot=None``: the planner chose FlexGen's order) runs FlexGen's.

Torch-free: the planner imports this.
"""
from __future__ import annotations

from klotski.program.context import Builder, StepContext, lm_head
from klotski.program.flexgen import flexgen_ops, layerwise_ops
from klotski.program.klotski import klotski_ops
from klotski.program.routing import ExpectedRouting, RecordingView, ReplayView, RoutingView

BUILDERS = {"layerwise": layerwise_ops, "flexgen": flexgen_ops, "resident": flexgen_ops, "klotski": klotski_ops}


def order_of(policy: str, num_hot: int | None) -> str:
    """The op order a plan runs in: its policy's, except that a klotski plan with ``num_hot=None`` is the
    planner's "FlexGen order" choice (klotski's own features off) and is simulated, sized and run as flexgen."""
    if policy == "klotski" and num_hot is None:
        return "flexgen"
    return policy


def step_ops(policy: str, b: Builder, view: RoutingView):
    """Yield the ops of one step under ``policy`` (its layers, then the LM head) into ``b``."""
    if policy not in BUILDERS:
        raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(BUILDERS)}")
    yield from BUILDERS[policy](b, view)
    yield from lm_head(b)


__all__ = ["BUILDERS", "Builder", "ExpectedRouting", "RecordingView", "ReplayView", "RoutingView", "StepContext",
           "order_of", "step_ops"]
