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


def test_contended_shares_count_other_lanes_once_and_only_inside_the_span():
    """A compute span 0-4 beside a prefetch 1-2 and a KV load 1.5-3 (overlapping each other: counted once) and
    a copy that ended before it: 2 of its 4 seconds had company. Spans of its own lane never count; a copy
    gets the compute spans beside it."""
    from klotski.runtime.trace import contended_shares

    spans = [("compute", "a", 0.0, 4.0, {}),
             ("prefetch", "p", 1.0, 2.0, {}),
             ("kv_load", "k", 1.5, 3.0, {}),
             ("expert_io", "old", -2.0, -1.0, {}),
             ("compute", "b", 5.0, 6.0, {}),       # alone (the other compute span is its own lane)
             ("prefetch", "q", 5.5, 7.0, {}),
             ("compute", "z", 8.0, 8.0, {})]       # zero length: left out
    got = contended_shares(spans)
    assert got[0] == pytest.approx(0.5)
    assert got[1] == pytest.approx(1.0) and got[2] == pytest.approx(1.0) and got[3] == 0.0
    assert got[4] == pytest.approx(0.5) and got[5] == pytest.approx(0.5 / 1.5)
    assert 6 not in got


def test_cpu_mode_observations_carry_the_contended_share():
    import torch

    tr = Tracer(torch.device("cpu"))
    cost = {"kind": "gate", "device": "gpu", "flops": 1.0, "score_flops": 0.0, "bytes": 0, "calls": 1, "tokens": 1}
    tr.spans = [("compute", "L0 gate b0", 0.0, 1.0, {"cost": cost}),
                ("kv_load", "L0 kv b1", 0.75, 2.0, {"bytes": 64})]
    tr._windows = [(0.0, 2.0)]
    (gate, _), (copy, _) = tr.observations()
    assert gate.contended == pytest.approx(0.25) and copy.contended == 0.0
