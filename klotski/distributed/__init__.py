"""Several devices: fully sharded expert streaming (FSE-DP) over ``torch.distributed``.

:mod:`klotski.distributed.schedule` is the per-layer schedule (pure data); the runtime and the ``torchrun``
entry point live beside it.
"""
from klotski.distributed.schedule import LayerSchedule, RoundOps, SliceTask, plan_layer, slice_bounds

__all__ = ["LayerSchedule", "RoundOps", "SliceTask", "plan_layer", "slice_bounds"]
