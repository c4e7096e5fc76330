"""The fully sharded expert streaming (FSE-DP) schedule of one MoE layer: pure data, no torch.

Tokens stay on their rank (data parallel). Each routed expert is cut into ``num_slices`` slices along its
intermediate dimension I (exact: ``y = sum_s W2[:, s] (act(W1[s] x) * W3[s] x)``). A slice is read from host
memory once, by one rank holding tokens for its expert (its *loader*), then forwarded round the ring over the
other ranks holding tokens for that expert; every rank on the path computes its own tokens' partial output.

Loaders (``loader=``): "most_tokens" gives every slice of an expert to the rank with most tokens for it (lowest
rank on a tie). "balanced" (the default) spreads host-link bytes: each slice goes to the rank of its path with the
fewest slices loaded so far in this layer, ties to the rank with most tokens for the expert, then the lowest rank.
With one host link per device and decode steps bound by host-link bandwidth, "most_tokens" can leave one link
doing most of the loading (one rank with slightly more tokens for every expert loads them all); "balanced" keeps
each link near 1/G of the bytes, as the paper's fully sharded placement of slices over memory channels does.

Time is counted in *rounds*. A slice task with path ``(r0, r1, ...)`` and start round ``t0`` is computed by
``r_j`` in round ``t0 + j``. Its slot on ``r_j`` is filled during round ``t0 + j - 1`` (a host load on ``r0``, a
receive from ``r_{j-1}`` elsewhere) and freed at the end of round ``t0 + j`` (after its send has completed). So
a rank's slots in use during round t = slices it computes in t + slices arriving for t + 1, and the placement
keeps that at most ``slots`` for every rank and round: a slice is only forwarded into a free slot.

Deadlock freedom: every send of round t on one rank matches a receive of round t on the next rank, all of a
round's sends and receives are posted together, and every rank walks the rounds in the same increasing order,
so no rank ever waits on an operation of a later round.

Placement: experts are ordered heavy/light interleaved (heaviest, lightest, second heaviest, second lightest,
...) by their total token count, their slices in order; each slice takes the earliest start round at which every
rank on its path stays within its slot bound, its loader has no other host load in that round and no rank on its
path has another send in the round it forwards it (one copy per lane per round, so a round lasts about one slice
copy and the host links load in every round instead of in bursts). Every rank derives the same schedule from
the same all-gathered token counts, with no communication beyond that all-gather.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def slice_bounds(intermediate: int, num_slices: int) -> list[tuple[int, int]]:
    """Column ranges [a, b) of I for each slice: as equal as possible, the first ones one wider."""
    if not isinstance(num_slices, int) or isinstance(num_slices, bool) or not 1 <= num_slices <= intermediate:
        raise ValueError(f"num_slices must be an int in [1, intermediate={intermediate}], got {num_slices!r}")
    base, extra = divmod(intermediate, num_slices)
    bounds, a = [], 0
    for s in range(num_slices):
        b = a + base + (1 if s < extra else 0)
        bounds.append((a, b))
        a = b
    return bounds


@dataclass(frozen=True)
class SliceTask:
    """One slice of one expert on its way round the ranks: ``path[j]`` computes it in round ``start + j``."""

    expert: int
    slice: int
    path: tuple[int, ...]  # path[0] loads it from host; each next rank receives it from the previous one
    start: int

    @property
    def loader(self) -> int:
        return self.path[0]

    def round_of(self, hop: int) -> int:
        return self.start + hop


@dataclass(frozen=True)
class RoundOps:
    """What one rank does in one round (each list of tasks in schedule order, the same order on every rank)."""

    round: int
    loads: tuple[SliceTask, ...]  # host loads filling slots for round + 1
    computes: tuple[SliceTask, ...]  # partial outputs computed in this round
    sends: tuple[tuple[SliceTask, int], ...]  # (task, destination rank), after computing it
    recvs: tuple[tuple[SliceTask, int], ...]  # (task, source rank): arrives for round + 1


@dataclass(frozen=True)
class LayerSchedule:
    num_ranks: int
    num_experts: int
    num_slices: int
    slots: int
    counts: tuple[tuple[int, ...], ...]  # [ranks][experts] token-expert pairs per rank
    tasks: tuple[SliceTask, ...]  # in placement order
    expert_order: tuple[int, ...]  # heavy/light interleaved order of the experts with tokens
    num_rounds: int
    loader: str
    _by_rank: dict = field(default=None, repr=False, compare=False)

    def rank_rounds(self, rank: int) -> list[RoundOps]:
        """The rounds -1 .. num_rounds - 1 in which ``rank`` has something to do (round -1: the first loads)."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} outside [0, {self.num_ranks})")
        loads: dict[int, list] = {}
        computes: dict[int, list] = {}
        sends: dict[int, list] = {}
        recvs: dict[int, list] = {}
        for task in self.tasks:
            for j, r in enumerate(task.path):
                t = task.round_of(j)
                if r == rank:
                    computes.setdefault(t, []).append(task)
                    if j == 0:
                        loads.setdefault(t - 1, []).append(task)
                    else:
                        recvs.setdefault(t - 1, []).append((task, task.path[j - 1]))
                    if j + 1 < len(task.path):
                        sends.setdefault(t, []).append((task, task.path[j + 1]))
        rounds = sorted(set(loads) | set(computes) | set(sends) | set(recvs))
        return [RoundOps(t, tuple(loads.get(t, ())), tuple(computes.get(t, ())), tuple(sends.get(t, ())),
                         tuple(recvs.get(t, ()))) for t in rounds]

    def slots_in_use(self, rank: int) -> list[int]:
        """Slots ``rank`` holds during rounds -1 .. num_rounds - 1 (index 0 is round -1)."""
        busy = [0] * (self.num_rounds + 1)
        for task in self.tasks:
            for j, r in enumerate(task.path):
                if r == rank:
                    t = task.round_of(j)
                    busy[t + 1] += 1  # computing in round t
                    busy[t] += 1  # arriving during round t - 1
        return busy


def _check_counts(counts) -> tuple[tuple[int, ...], ...]:
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    rows = [list(r) for r in counts]
    if not rows:
        raise ValueError("counts must be [ranks, experts] with at least one rank, got no rows")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"counts row {i} has {len(row)} experts, row 0 has {width}")
        for e, c in enumerate(row):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"counts[{i}][{e}] must be an int >= 0, got {c!r}")
    return tuple(tuple(r) for r in rows)


def ring_path(column: tuple[int, ...], loader: int | None = None) -> tuple[int, ...]:
    """The ranks with tokens for one expert (``column`` [ranks] token counts), starting at ``loader`` (default:
    the one with most, lowest rank on a tie) and going round the ring in increasing rank order; () when nobody
    needs it."""
    if not any(column):
        return ()
    ranks = len(column)
    if loader is None:
        loader = max(range(ranks), key=lambda r: (column[r], -r))
    elif not column[loader]:
        raise ValueError(f"loader rank {loader} has no tokens for this expert")
    return tuple((loader + d) % ranks for d in range(ranks) if column[(loader + d) % ranks] > 0)


def interleave_heavy_light(totals: list[int]) -> list[int]:
    """Experts with tokens, ordered heaviest, lightest, second heaviest, second lightest, ... (ties by id)."""
    order = sorted((e for e, t in enumerate(totals) if t > 0), key=lambda e: (-totals[e], e))
    out, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        out.append(order[lo])
        if hi != lo:
            out.append(order[hi])
        lo, hi = lo + 1, hi - 1
    return out


LOADERS = ("balanced", "most_tokens")


def plan_layer(counts, num_slices: int, slots: int, loader: str = "balanced") -> LayerSchedule:
    """The schedule of one MoE layer from ``counts`` [ranks][experts] (token-expert pairs each rank routes to each
    expert, all-gathered), ``num_slices`` slices per expert, ``slots`` slice buffers per rank and the ``loader``
    rule (:data:`LOADERS`, see the module docstring)."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    counts = _check_counts(counts)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices must be an int >= 1, got {num_slices!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an int >= 1, got {slots!r}")
    ranks, experts = len(counts), len(counts[0])
    totals = [sum(counts[r][e] for r in range(ranks)) for e in range(experts)]
    order = interleave_heavy_light(totals)
    # computing[r][t]: slices rank r computes in round t; slots in use in round t = computing[t] + computing[t+1]
    computing: list[list[int]] = [[] for _ in range(ranks)]

    def at(r: int, t: int) -> int:
        return computing[r][t] if 0 <= t < len(computing[r]) else 0

    # one copy per lane per round: loads[r][t] host loads for round t on r, sends[r][t] sends r makes in round t
    loads: list[dict[int, int]] = [{} for _ in range(ranks)]
    sends: list[dict[int, int]] = [{} for _ in range(ranks)]

    def fits(path, start) -> bool:
        if loads[path[0]].get(start, 0) >= 1:
            return False
        for j, r in enumerate(path):
            t = start + j
            if at(r, t - 1) + at(r, t) + 1 > slots or at(r, t) + at(r, t + 1) + 1 > slots:
                return False
            if j + 1 < len(path) and sends[r].get(t, 0) >= 1:
                return False
        return True

    tasks = []
    loaded = [0] * ranks  # slices each rank loads from host in this layer
    for e in order:
        column = tuple(counts[r][e] for r in range(ranks))
        for s in range(num_slices):
            if loader == "balanced":
                first = min((r for r in range(ranks) if column[r]), key=lambda r: (loaded[r], -column[r], r))
                path = ring_path(column, first)
            else:
                path = ring_path(column)
            loaded[path[0]] += 1
            start = 0
            while not fits(path, start):
                start += 1
            loads[path[0]][start] = 1
            for j, r in enumerate(path):
                t = start + j
                if j + 1 < len(path):
                    sends[r][t] = 1
                if len(computing[r]) <= t:
                    computing[r].extend([0] * (t + 1 - len(computing[r])))
                computing[r][t] += 1
            tasks.append(SliceTask(e, s, path, start))
    num_rounds = max((t.start + len(t.path) for t in tasks), default=0)
    return LayerSchedule(ranks, experts, num_slices, slots, counts, tuple(tasks), tuple(order), num_rounds,
                         loader)
