"""The offloaded runtime: executes the layerwise / flexgen / klotski schedules for real.

:class:`~klotski.runtime.session.OffloadedSession` is the entry point: it plans with :mod:`klotski.planner`,
places the weights under the budgets (device, host memory, disk through the packed expert store in
``offload_dir``), builds an :class:`~klotski.runtime.executor.OffloadedExecutor` (ResidentModel's protocol
``new_cache`` / ``forward``) and owns its lifecycle (re-plan, warm-up, metrics, close).

On ``cuda`` copies run on dedicated streams with events; on ``cpu`` the "device" is a bounded RAM pool and
copies run on worker threads, so disk streaming and overlap are real in CI too.
"""
from __future__ import annotations

from klotski.runtime.build import OFFLOAD_POLICIES, RunConfig, RunPlan, check_offload_dir
from klotski.runtime.executor import OffloadedExecutor
from klotski.runtime.memory import BudgetError
from klotski.runtime.session import PREFETCH_TABLE, OffloadedSession

__all__ = ["OFFLOAD_POLICIES", "PREFETCH_TABLE", "BudgetError", "OffloadedExecutor", "OffloadedSession", "RunConfig",
           "RunPlan", "check_offload_dir"]
