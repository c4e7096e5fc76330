"""The tracer's observations for calibration: a compute op counts the dispatch gap before it that no other lane
explains, and nothing across forwards."""
import pytest

from klotski.runtime.trace import Tracer, dispatch_gaps


def test_dispatch_gaps_count_only_unexplained_idle_time_within_a_forward():
    spans = [("compute", "a", 0.0, 1.0, {}),
             ("compute", "b", 1.5, 2.0, {}),      # 0.5 idle, nothing else ended: dispatch
             ("prefetch", "L0 e1", 0.5, 2.8, {}),
             ("compute", "c", 3.0, 4.0, {}),      # waited for the load that ended at 2.8: not counted
             ("compute", "d", 4.0, 4.5, {}),      # back to back
             ("compute", "e", 5.2, 6.0, {})]      # first op of the next forward (window from 5.0)
    gaps = dispatch_gaps(spans, [(0.0, 4.6), (5.0, 6.1)])
    assert gaps == {1: pytest.approx(0.5)}


def test_observations_add_the_gap_to_the_op_after_it():
    import torch

    tr = Tracer(torch.device("cpu"))
    tr.spans = [("compute", "L0 gate b0", 0.0, 1.0, {"op": "gate", "flops": 1.0}),
                ("compute", "L0 experts", 1.5, 2.0, {"op": "experts", "flops": 2.0})]
    tr._windows = [(0.0, 2.0)]
    assert [s for _, s in tr.observations()] == [pytest.approx(1.0), pytest.approx(1.0)]  # 0.5 + the gap 0.5
