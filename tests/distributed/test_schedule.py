"""The FSE-DP layer schedule: host loads once, ring paths, slot bounds, identical and deterministic plans."""
import random
from multiprocessing import get_context

import pytest

from klotski.distributed.schedule import interleave_heavy_light, plan_layer, ring_path, slice_bounds


def zipf_counts(ranks, experts, tokens, seed, skew=1.2):
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** skew for i in range(experts)]
    rng.shuffle(weights)
    counts = [[0] * experts for _ in range(ranks)]
    for r in range(ranks):
        for _ in range(rng.randint(0, tokens)):
            counts[r][rng.choices(range(experts), weights)[0]] += 1
    return counts


ROUTINGS = {
    "random": [[random.Random(r).randint(0, 5) for _ in range(8)] for r in range(4)],
    "skewed": zipf_counts(4, 8, 40, seed=1),
    "one_rank": [[3, 0, 1, 9, 0, 0, 2, 1], [0] * 8, [0] * 8],
    "empty": [[0] * 6, [0] * 6],
    "single_rank_world": [[4, 0, 2, 7]],
    "all_on_each": [[1] * 5 for _ in range(3)],
}


def occupancy(sched):
    """[rank][round + 1] slots in use, recomputed from the tasks (compute round + arriving round)."""
    busy = [[0] * (sched.num_rounds + 2) for _ in range(sched.num_ranks)]
    for task in sched.tasks:
        for j, r in enumerate(task.path):
            t = task.start + j
            busy[r][t + 1] += 1
            busy[r][t] += 1
    return busy


@pytest.mark.parametrize("loader", ["balanced", "most_tokens"])
@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("slices,slots", [(1, 2), (3, 2), (4, 3), (2, 5)])
def test_schedule_invariants(name, slices, slots, loader):
    counts = ROUTINGS[name]
    sched = plan_layer(counts, slices, slots, loader)
    ranks, experts = len(counts), len(counts[0])
    needed = [e for e in range(experts) if any(counts[r][e] for r in range(ranks))]
    # every (expert, slice) with tokens somewhere is loaded from host exactly once, by one rank
    loads = {}
    for r in range(ranks):
        for ops in sched.rank_rounds(r):
            for task in ops.loads:
                key = (task.expert, task.slice)
                assert key not in loads, f"{key} loaded twice"
                loads[key] = r
    assert sorted(loads) == [(e, s) for e in needed for s in range(slices)]
    for task in sched.tasks:
        holders = {r for r in range(ranks) if counts[r][task.expert] > 0}
        assert set(task.path) == holders and len(task.path) == len(holders)  # exactly the ranks with tokens
        if loader == "most_tokens":
            assert counts[task.path[0]][task.expert] == max(counts[r][task.expert] for r in range(ranks))
        # the path goes round the ring from its loader
        assert list(task.path) == sorted(task.path, key=lambda r: (r - task.path[0]) % ranks)
        assert loads[(task.expert, task.slice)] == task.path[0]
        assert task.start >= 0
    # slot bound, counted independently of the module's own bookkeeping
    for r, busy in enumerate(occupancy(sched)):
        assert max(busy, default=0) <= slots, (r, busy)
        assert busy[: sched.num_rounds + 1] == sched.slots_in_use(r)
    # per rank: every send has its receive on the destination in the same round (the deadlock-free order)
    sends = {(r, ops.round, t.expert, t.slice, dst) for r in range(ranks) for ops in sched.rank_rounds(r)
             for t, dst in ops.sends}
    recvs = {(src, ops.round, t.expert, t.slice, r) for r in range(ranks)
             for ops in sched.rank_rounds(r) for t, src in ops.recvs}
    assert sends == {(src, rnd, e, s, dst) for (src, rnd, e, s, dst) in recvs}
    # one copy per lane per round: at most one host load and one send per rank and round
    for r in range(ranks):
        for ops in sched.rank_rounds(r):
            assert len(ops.loads) <= 1 and len(ops.sends) <= 1, (r, ops.round)
    # each rank computes every slice of every expert it has tokens for, exactly once
    for r in range(ranks):
        done = sorted((t.expert, t.slice) for ops in sched.rank_rounds(r) for t in ops.computes)
        assert done == [(e, s) for e in needed if counts[r][e] > 0 for s in range(slices)]


def test_balanced_loaders_spread_host_bytes():
    counts = [[9, 5, 7, 3, 8, 6], [1, 2, 1, 2, 1, 1]]  # rank 0 has more tokens for every expert
    most = plan_layer(counts, 4, 2, "most_tokens")
    bal = plan_layer(counts, 4, 2, "balanced")
    per_rank = lambda sched: [sum(t.loader == r for t in sched.tasks) for r in range(2)]  # noqa: E731
    assert per_rank(most) == [24, 0]
    assert per_rank(bal) == [12, 12]
    # an expert only one rank needs is always loaded by that rank
    only = plan_layer([[3, 0], [0, 4]], 3, 2)
    assert {(t.expert, t.loader) for t in only.tasks} == {(0, 0), (1, 1)}


def test_round_order_follows_the_path():
    sched = plan_layer(ROUTINGS["skewed"], 3, 2)
    for task in sched.tasks:
        for j, r in enumerate(task.path):
            ops = {o.round: o for o in sched.rank_rounds(r)}
            assert task in ops[task.start + j].computes
            if j == 0:
                assert task in ops[task.start - 1].loads
            else:
                assert (task, task.path[j - 1]) in ops[task.start + j - 1].recvs
            if j + 1 < len(task.path):
                assert (task, task.path[j + 1]) in ops[task.start + j].sends


def _plan_in_child(args):
    counts, slices, slots = args
    return plan_layer(counts, slices, slots)


def test_identical_across_processes_and_deterministic():
    counts = ROUTINGS["skewed"]
    here = plan_layer(counts, 3, 2)
    assert plan_layer([list(r) for r in counts], 3, 2) == here  # deterministic
    with get_context("spawn").Pool(2) as pool:  # derived independently, as each rank does
        theirs = pool.map(_plan_in_child, [(counts, 3, 2)] * 2)
    assert all(t == here for t in theirs)
    assert [t.path for t in theirs[0].tasks] == [t.path for t in here.tasks]


def test_empty_and_single_rank():
    empty = plan_layer(ROUTINGS["empty"], 2, 2)
    assert empty.tasks == () and empty.num_rounds == 0 and empty.rank_rounds(1) == []
    solo = plan_layer(ROUTINGS["single_rank_world"], 2, 2)
    assert all(t.path == (0,) for t in solo.tasks) and len(solo.tasks) == 6
    assert all(not ops.sends and not ops.recvs for ops in solo.rank_rounds(0))


def test_ring_path_and_interleave():
    assert ring_path((1, 5, 0, 5)) == (1, 3, 0)  # most tokens first (lowest rank on a tie), then round the ring
    assert ring_path((0, 0, 0)) == ()
    assert ring_path((1, 5, 0, 5), loader=3) == (3, 0, 1)
    with pytest.raises(ValueError, match="loader rank 2"):
        ring_path((1, 5, 0, 5), loader=2)
    assert interleave_heavy_light([5, 0, 9, 1, 3]) == [2, 3, 0, 4]
    assert slice_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_slot_bound_stretches_the_schedule():
    counts = [[2] * 4, [2] * 4]
    wide, narrow = plan_layer(counts, 2, 6), plan_layer(counts, 2, 2)
    assert narrow.num_rounds > wide.num_rounds
    assert max(max(b) for b in occupancy(narrow)) == 2


@pytest.mark.parametrize("bad,match", [
    (dict(counts=[], num_slices=1, slots=2), "at least one rank"),
    (dict(counts=[[1, 2], [1]], num_slices=1, slots=2), "row 1 has 1 experts"),
    (dict(counts=[[1, -1]], num_slices=1, slots=2), r"counts\[0\]\[1\]"),
    (dict(counts=[[1]], num_slices=0, slots=2), "num_slices"),
    (dict(counts=[[1]], num_slices=1, slots=0), "slots"),
    (dict(counts=[[1]], num_slices=1, slots=2, loader="nearest"), "loader"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        plan_layer(**bad)
    with pytest.raises(ValueError, match="num_slices"):
        slice_bounds(4, 5)
