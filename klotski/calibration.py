"""Fitting a hardware profile to a measured run: per-op (op, seconds) pairs -> calibrated rates and overheads.

The planner's predictions are only as good as its profile; :func:`calibrate` fits the profile's compute rates
and per-call overhead (jointly, :func:`fit_compute`), each op kind's own fixed costs (:func:`fit_kind_costs`)
and its links' bandwidths to what a real run measured (``klotski.runtime.planning.calibrate_from_run`` collects
the pairs from the executor's trace).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from klotski.costs import op_seconds

CALIBRATION_KEYS = ("matmul", "attention", "h2d", "d2h", "disk")


def _category(op) -> str | None:
    if op.link is not None:
        return op.link
    if op.kind == "attn":
        return "attention"
    if op.kind == "release":
        return None
    return "matmul"


def fit_compute(rows) -> tuple[float, float, float | None] | tuple[float, float, float | None, float | None] | None:
    """Least squares ``seconds = calls * overhead + flops / rate + score_flops / attn_rate [+ bytes / bandwidth]``
    over compute ops, in the log of each op's measured / predicted ratio (:func:`_log_fit`; each op one
    observation, whatever its size: a fit in absolute seconds lets the largest ops set every term, and a
    per-call overhead that absorbs their error over-prices every small op, e.g. a gate, tenfold).

    ``rows``: (calls, flops, score_flops, measured seconds[, bytes read]). -> (overhead s per call, matmul
    FLOP/s, attention FLOP/s or None when no op had score FLOPs) with, when rows carry bytes, a fourth item:
    the memory bandwidth in bytes/s (None when the bytes term was not fitted), or None when no model fits
    with positive terms. When the full model gives a non-positive coefficient (noise, or a term the ops
    cannot separate), smaller models are tried: without the bytes term, score FLOPs at the matmul rate, then
    no per-call overhead; the positive fit with the least squared log ratio wins.

    The log fit gives the terms' shape from the typical op; its level is then scaled so that the model sums to
    the run's measured total (what a plan's tokens/s depends on). On a quiet machine the scale is about 1; on
    a shared one, where other jobs preempt some ops for many times their length, the total is the mean cost
    of an op on that machine and the typical op measures faster than priced, by the run's total over its
    typical (the bench of host compute reports both).
    """
    import numpy as np

    calls = np.array([r[0] for r in rows], dtype=float)
    flops = np.array([r[1] for r in rows], dtype=float)
    score = np.array([r[2] for r in rows], dtype=float)
    y = np.array([r[3] for r in rows], dtype=float)
    with_bytes = bool(rows) and all(len(r) > 4 for r in rows)
    nbytes = np.array([r[4] if len(r) > 4 else 0 for r in rows], dtype=float)
    has_scores = bool((score > 0).any())
    # (columns, how the coefficients map to (overhead, 1/rate, 1/attn rate))
    models = []
    if has_scores:
        models.append(([calls, flops, score], lambda c: (c[0], c[1], c[2])))
    models.append(([calls, flops + score], lambda c: (c[0], c[1], c[1] if has_scores else None)))
    if has_scores:
        models.append(([flops, score], lambda c: (0.0, c[0], c[1])))
    models.append(([flops + score], lambda c: (0.0, c[0], c[0] if has_scores else None)))
    if with_bytes and (nbytes > 0).any():  # each model with the memory term too (tried first)
        models = [(cols + [nbytes], unpack) for cols, unpack in models] + models
    y = np.maximum(y, 1e-12)
    best = None
    for cols, unpack in models:
        A = np.stack(cols, axis=1)
        if len(rows) < A.shape[1] + 1 or np.linalg.matrix_rank(A) < A.shape[1]:
            continue
        coef = _log_fit(A, y)
        if coef is None:
            continue
        pred = A @ coef
        if (pred <= 0).any():  # an op this model prices at nothing (all its columns zero)
            continue
        err = float((np.log(pred / y) ** 2).sum())
        coef = coef * (y.sum() / pred.sum())  # the level: the run's total (see the docstring)
        if best is None or err < best[0]:
            best = (err, unpack(coef), coef[-1] if cols[-1] is nbytes else None)
    if best is None:
        return None
    overhead, inv_rate, inv_attn = best[1]
    out = (float(overhead), float(1.0 / inv_rate), (float(1.0 / inv_attn) if inv_attn is not None else None))
    if with_bytes:
        return out + ((float(1.0 / best[2]) if best[2] is not None else None),)
    return out


def _log_fit(A, y, rounds: int = 4, offset=0.0):
    """Positive coefficients c of ``y ~ A @ c + offset`` (``offset``: a fixed part of each prediction)
    minimizing, nearly, the squared log ratio of measured to predicted (each op's factor off, the error a
    "within 2x" claim is about): iteratively reweighted least squares, weights 1 / y first (relative error),
    then 1 / sqrt(y * prediction) (the residual becomes sqrt(p / y) - sqrt(y / p), symmetric in the ratio and
    equal to its log to first order). A plain relative fit under-prices ops whose times spread (a preempted op
    counts at most -1, a fast one without bound). None when the first fit has a non-positive coefficient;
    later rounds that would are not taken."""
    import numpy as np

    scale = A.max(axis=0)
    coef = None
    weight = 1.0 / y
    for _ in range(rounds):
        got, *_ = np.linalg.lstsq(A / scale * weight[:, None], (y - offset) * weight, rcond=None)
        got = got / scale
        if (got <= 0).any():
            break
        coef = got
        pred = A @ coef + offset
        if (pred <= 0).any():
            break
        weight = 1.0 / np.sqrt(y * pred)
    return coef


def calibrate(hw, observations: Iterable[tuple[object, float]], dtype: str = "bfloat16"):
    """A profile whose parameters are fitted so predicted op times match measured ones.

    ``observations``: ``(op, measured_seconds)`` pairs from a real run. Compute ops of each side (device or
    CPU) are fitted jointly as ``calls * overhead + flops / rate + score_flops / attention rate + bytes /
    memory bandwidth`` (:func:`fit_compute`), which sets the per-call overhead, both rates and the memory
    bandwidth: folding a per-call cost into the rate would mispredict ops of other sizes (a decode-step fit
    then triples prefill), and folding the weight reads of memory-bound ops (decode experts) into the
    per-call overhead over-prices every op that reads little. The fit is additive; ``op_seconds`` takes the
    larger of the compute and memory terms, so an op whose two terms are equal is predicted up to 2x short.
    In CPU mode (``hw.device == "cpu"``) the device is the CPU: both sides' ops are one processor's, fitted
    together, and the fit sets both sides' fields. Where the rows cannot separate the terms, the scale is
    ``sum(predicted) / sum(measured)`` per category and rates are multiplied by it. A link's bandwidth (h2d,
    d2h, disk) is set so its copies' predicted seconds (latency + bytes / bandwidth each) sum to the measured
    ones. Categories without observations are left unchanged. Last, each op kind timed often enough gets its
    own seconds per call and per token on top of the fitted rates (:func:`fit_kind_costs`).
    """
    observations = list(observations)
    pred: dict[tuple[str, str], float] = {}
    meas: dict[tuple[str, str], float] = {}
    compute_rows: dict[str, list[tuple[int, float, float, float, int]]] = {}
    copies: dict[str, list[int]] = {}  # link -> [copies with bytes, bytes]
    one_processor = hw.device == "cpu"
    for op, seconds in observations:
        cat = _category(op)
        if cat is None or seconds <= 0 or (op.link is not None and op.bytes <= 0):
            continue  # a copy of nothing (a prefill's KV load of an empty cache) says nothing of its link
        dev = "cpu" if (op.link is None and op.device == "cpu" and not one_processor) else "gpu"
        pred[(cat, dev)] = pred.get((cat, dev), 0.0) + op_seconds(op, hw, dtype)
        meas[(cat, dev)] = meas.get((cat, dev), 0.0) + seconds
        if op.link is not None and op.bytes > 0:
            c = copies.setdefault(cat, [0, 0])
            c[0] += 1
            c[1] += op.bytes
        if cat in ("matmul", "attention"):
            compute_rows.setdefault(dev, []).append((max(1, op.calls), op.flops, op.score_flops, seconds, op.bytes))
    changes: dict = {}
    fitted: set[str] = set()
    for dev, rows in compute_rows.items():
        fit = fit_compute(rows)
        if fit is None:
            continue
        overhead, rate, attn_rate, bandwidth = fit
        on_cpu = dev == "cpu"
        mm_field = "cpu_matmul_flops" if on_cpu else "matmul_flops"
        old = getattr(hw, mm_field)
        ratio = rate / hw.matmul_rate(dtype, dev)
        changes[mm_field] = {k: v * ratio for k, v in old.items()} | {dtype: rate}
        changes["cpu_op_overhead_s" if on_cpu else "op_overhead_s"] = overhead
        if attn_rate is not None:
            changes["cpu_attention_flops" if on_cpu else "attention_flops"] = attn_rate
        if bandwidth is not None:
            changes["cpu_mem_bandwidth" if on_cpu else "device_mem_bandwidth"] = bandwidth
        fitted.add(dev)
    for (cat, dev), p in pred.items():
        if cat in ("matmul", "attention") and dev in fitted:
            continue
        s = p / meas[(cat, dev)]
        if cat == "matmul":
            field = "cpu_matmul_flops" if dev == "cpu" else "matmul_flops"
            changes[field] = {k: v * s for k, v in getattr(hw, field).items()}
        elif cat == "attention":
            field = "cpu_attention_flops" if dev == "cpu" else "attention_flops"
            changes[field] = getattr(hw, field) * s
        else:
            field = {"h2d": "h2d_bandwidth", "d2h": "d2h_bandwidth", "disk": "disk_bandwidth"}[cat]
            count, nbytes = copies.get(cat, (0, 0))
            transfer = meas[(cat, dev)] - count * hw.transfer_latency_s  # the latency term stays as profiled
            changes[field] = nbytes / transfer if nbytes and transfer > 0 else getattr(hw, field) * s
    if one_processor:
        changes = same_processor(hw, changes)
    if not changes:
        return hw
    return fit_kind_costs(replace(hw, source=f"{hw.source}+calibrated", **changes), observations, dtype)


MIN_KIND_OPS = 8  # observations of one op kind needed to fit that kind's own costs
CONTENTION_GRID = tuple(k / 20 for k in range(61))  # CPU mode: the contention shares tried, 0 to 3


def fit_kind_costs(hw, observations, dtype: str = "bfloat16"):
    """``hw`` with, for each compute op kind the run timed at least :data:`MIN_KIND_OPS` times, that kind's own
    seconds per call and per token beyond the roofline (``kind_costs``, ``cpu_kind_costs``; the rates and the
    generic ``op_overhead_s`` stay as they are, and the tables are replaced by this run's) and, in CPU mode,
    how much those fixed costs grow while another lane runs beside the op (``contention``).

    The generic overhead is one figure for every op, but an op's fixed cost is its kernels' launches and
    dispatch, which the kinds do not share: in CPU mode eager torch runs about 40 kernels for a decode step's
    attention (norm, three projections, rotary, cache append, two matmuls and a softmax, output projection,
    residual) and one for the MLP's closing residual add, so one figure priced the first at half its time and
    the second at three times. The roofline prices the hidden rows an op reads once; an eager RMSNorm, a
    gather or a rotary makes several passes over them, which the per-token term holds (a prefill's gate
    spent about twice as long on its normed input, 1024 rows, as on its router). Each kind's two terms
    minimise, nearly, the squared log of measured / predicted over its ops (:func:`_log_fit`, the roofline at
    ``hw``'s rates as a fixed offset); when the pair is not positive, the better of the two alone. Their level
    is then scaled so that the kind's ops sum to their measured total (what a plan's tokens/s depends on; see
    :func:`fit_compute`).

    CPU mode runs every lane (copies, the host lanes) on the same cores, and an op's fixed costs (the
    interpreter dispatching its small kernels) grow while another lane runs: a decode step's gate took 0.46 ms
    beside the other micro-batch's KV copies and 0.22 ms alone. A profile fitted on a run where it always
    had company then priced the same gate in a run where it had none at twice its time. There each op's fixed
    costs are ``(calls * per call + tokens * per token) * (1 + contention * contended)``, ``contended`` the
    share of its span another lane ran beside it (``Op.contended``, from the trace); the one ``contention``
    of all kinds is the value of :data:`CONTENTION_GRID` with the least squared log error summed over the
    kinds (each kind refitted at it; kinds timed both alone and beside a lane identify it)."""
    import numpy as np

    from klotski.costs import op_timer

    one_processor = hw.device == "cpu"
    plain = replace(hw, kind_costs={}, cpu_kind_costs={}, contention=0.0)
    timer = op_timer(plain, dtype)
    groups: dict[tuple[str, str], list] = {}
    for op, seconds in observations:
        if op.link is not None or op.kind == "release" or op.duration is not None or seconds <= 0:
            continue
        side = "cpu" if (op.device == "cpu" and not one_processor) else "gpu"
        groups.setdefault((side, op.kind), []).append((op, seconds))
    columns = []  # per kind with enough ops: (side, kind, calls, tokens, contended, measured, roofline, overhead)
    for (side, kind), rows in sorted(groups.items()):
        if len(rows) < MIN_KIND_OPS:
            continue
        overhead = hw.cpu_op_overhead_s if side == "cpu" else hw.op_overhead_s
        calls = np.array([max(1, op.calls) for op, _ in rows], dtype=float)
        columns.append((side, kind, calls, np.array([op.tokens for op, _ in rows], dtype=float),
                        np.array([op.contended for op, _ in rows], dtype=float),
                        np.array([s for _, s in rows], dtype=float),
                        np.maximum(np.array([timer(op) for op, _ in rows]) - calls * overhead, 0.0),
                        calls * overhead))
    shared = one_processor and any((c[4] > 0).any() for c in columns)
    best = None  # (summed error, contention, found)
    for contention in (CONTENTION_GRID if shared else (0.0,)):
        err, found = 0.0, {"gpu": {}, "cpu": {}}
        for side, kind, calls, tokens, contended, y, rest, generic in columns:
            got = _fit_kind(calls, tokens, 1.0 + contention * contended, y, rest)
            if got is None:  # the kind keeps the generic terms (and their error)
                err += float((np.log((rest + generic) / y) ** 2).sum())
            else:
                err += got[0]
                found[side][kind] = got[1]
        if best is None or err < best[0] - 1e-12:
            best = (err, contention, found)
    _, contention, found = best
    if one_processor:
        found["cpu"] = {k: list(v) for k, v in found["gpu"].items()}
    return replace(hw, kind_costs=found["gpu"], cpu_kind_costs=found["cpu"],
                   contention=contention if one_processor else hw.contention)


def _fit_kind(calls, tokens, factor, y, rest):
    """One kind's (squared log error, [seconds per call, seconds per token]) for ``y ~ rest + factor * (calls
    * a + tokens * b)`` (:func:`fit_kind_costs`), or None when no positive model fits."""
    import numpy as np

    best = None
    for cols in ((0, 1), (0,), (1,)):
        A = np.stack([(calls, tokens)[c] * factor for c in cols], axis=1)
        if np.linalg.matrix_rank(A) < A.shape[1]:
            continue
        coef = _log_fit(A, y, offset=rest)
        if coef is None or (A @ coef + rest <= 0).any():  # an op this model prices at nothing
            continue
        err = float((np.log((A @ coef + rest) / y) ** 2).sum())
        if best is None or err < best[0]:
            terms = [0.0, 0.0]
            for c, v in zip(cols, coef):
                terms[c] = float(v)
            best = (err, terms)
    if best is None:
        return None
    fixed = factor * (calls * best[1][0] + tokens * best[1][1])  # the level: the kind's measured total
    level = (y.sum() - rest.sum()) / fixed.sum()
    return best[0], ([float(v * level) for v in best[1]] if level > 0 else best[1])


DEVICE_TO_CPU = {"matmul_flops": "cpu_matmul_flops", "attention_flops": "cpu_attention_flops",
                 "op_overhead_s": "cpu_op_overhead_s", "device_mem_bandwidth": "cpu_mem_bandwidth",
                 "kind_costs": "cpu_kind_costs"}


def same_processor(hw, changes: dict) -> dict:
    """CPU mode: ``changes`` to the device's compute fields applied to the CPU's too (one processor)."""
    if hw.device != "cpu":
        return changes
    return changes | {DEVICE_TO_CPU[k]: (dict(v) if isinstance(v, dict) else v)
                      for k, v in changes.items() if k in DEVICE_TO_CPU}
