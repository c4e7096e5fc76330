"""This machine's hardware profile: one cache, one precedence, corrected by every offloaded run.

Precedence, the same for ``klotski profile``, ``klotski plan``, ``klotski bench`` and the runtime:

1. a profile given explicitly (``hardware=`` / ``--hardware NAME|FILE``);
2. the cached profile of the device, ``$XDG_CACHE_HOME/klotski/hardware-<device>.json`` (or
   ``~/.cache/klotski/``): measured once, then refined by the calibration of offloaded runs;
3. otherwise a fresh measurement, cached only when it can be trusted.

A measurement is trusted when the machine was not busy and two passes agree on the compute rates and the
per-call overhead within :data:`TOLERANCE`. Under the Triton interpreter (``TRITON_INTERPRET=1``: every CPU
expert call runs in the interpreter, ~100x slower than the torch path a real run takes) the profile is kept in
a file of its own, ``hardware-<device>-interpreter.json``, used only by runs under the interpreter. Up to ``attempts``
passes are made (waiting between them while the machine is busy); otherwise the best pass is returned marked
``provisional``: the run uses it, nothing is cached, and the next run measures again.

After an offloaded run, :meth:`ProfileCache.feed_back` fits the profile to the run's per-op timings
(:func:`klotski.calibration.calibrate`) and caches the result, so a profile measured under load (rates 10x
too low, say) does not outlive one run: one that mispredicts the run by more than 3x is measured again, and
only the rates the run could identify are taken from the fit. Runs under the interpreter are not fed back.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

from klotski.hardware import HardwareProfile, default_profile_path, measure_profile

TOLERANCE = 0.35  # two passes agree when each key figure is within 35 % of the other's
BUSY_WAIT_S = 2.0
PROVISIONAL = "provisional"
INTERPRETER_SOURCE = "measured (interpreter)"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _busy() -> bool:
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # pragma: no cover
        return False
    return load > 1.0 + 0.5 * cores


def _key_figures(hw: HardwareProfile) -> dict[str, float]:
    return {"matmul": max(hw.matmul_flops.values()), "overhead": hw.op_overhead_s, "h2d": hw.h2d_bandwidth}


def agree(a: HardwareProfile, b: HardwareProfile, tolerance: float = TOLERANCE) -> bool:
    fa, fb = _key_figures(a), _key_figures(b)
    return all(abs(fa[k] - fb[k]) <= tolerance * max(fa[k], fb[k]) for k in fa)


def best_of(a: HardwareProfile, b: HardwareProfile) -> HardwareProfile:
    """Per figure, the less disturbed of two passes: the higher rate, the lower overhead."""
    hi = lambda x, y: {k: max(x[k], y.get(k, 0.0)) for k in x}  # noqa: E731
    return replace(a, matmul_flops=hi(a.matmul_flops, b.matmul_flops),
                   cpu_matmul_flops=hi(a.cpu_matmul_flops, b.cpu_matmul_flops),
                   attention_flops=max(a.attention_flops, b.attention_flops),
                   h2d_bandwidth=max(a.h2d_bandwidth, b.h2d_bandwidth),
                   d2h_bandwidth=max(a.d2h_bandwidth, b.d2h_bandwidth),
                   disk_bandwidth=max(a.disk_bandwidth, b.disk_bandwidth),
                   device_mem_bandwidth=max(a.device_mem_bandwidth, b.device_mem_bandwidth),
                   op_overhead_s=min(a.op_overhead_s, b.op_overhead_s),
                   cpu_op_overhead_s=min(a.cpu_op_overhead_s, b.cpu_op_overhead_s))


def is_provisional(hw: HardwareProfile) -> bool:
    return PROVISIONAL in hw.source


class ProfileCache:
    """The cached profiles of this machine, one JSON file per device type ("cuda", "cpu")."""

    def __init__(self, root: str | os.PathLike | None = None, measure=measure_profile, attempts: int = 3):
        self.root = Path(root) if root is not None else default_profile_path("cpu").parent
        self.measure_fn = measure
        self.attempts = attempts

    def path(self, device: str) -> Path:
        """The cache file of ``device``; under the Triton interpreter a separate one, so a profile timed in the
        interpreter serves that process's runs and never becomes the machine's."""
        name = default_profile_path(device).name
        return self.root / (name.replace(".json", "-interpreter.json") if interpreter_on() else name)

    def load(self, device: str) -> HardwareProfile | None:
        """The cached profile, or None (none cached; an unreadable one is ignored with a warning)."""
        path = self.path(device)
        if not path.is_file():
            return None
        try:
            hw = HardwareProfile.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            warnings.warn(f"ignoring the cached hardware profile {path}: {e}; measuring again", stacklevel=2)
            return None
        if hw.device != device or is_provisional(hw) or (hw.source == INTERPRETER_SOURCE) != interpreter_on():
            return None
        return hw

    def save(self, hw: HardwareProfile) -> Path | None:
        """Cache ``hw`` (never a provisional one); a failure to write warns and returns None."""
        from klotski.store.directory import atomic_write

        if is_provisional(hw):
            return None
        path = self.path(hw.device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(str(path), lambda f: f.write(json.dumps(hw.to_dict(), indent=2) + "\n"), mode="w")
        except OSError as e:
            warnings.warn(f"could not cache the hardware profile at {path}: {e.strerror or e}", stacklevel=2)
            return None
        return path

    def get(self, device: str) -> HardwareProfile:
        """The cached profile of ``device``, else a fresh measurement (cached when trusted)."""
        return self.load(device) or self.measure(device)

    def measure(self, device: str, **kwargs) -> HardwareProfile:
        """Measure ``device`` until two passes agree on a quiet machine; cache and return the result, or
        return the best pass marked provisional (not cached) with a warning saying why."""
        if interpreter_on():  # one pass, cached apart (see path()): the interpreter's rates are its own
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hw = self.measure_fn(device=device, **kwargs)
            hw = replace(hw, source=INTERPRETER_SOURCE, notes=f"{hw.notes}; timed with TRITON_INTERPRET=1 (expert "
                         f"calls in the Triton interpreter): used only by runs under the interpreter")
            self.save(hw)
            return hw
        why, last, best = "", None, None
        for attempt in range(self.attempts):
            if _busy():
                why = "the machine is busy (load average above half its cores)"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # measure_profile's own busy warning: reported once, below
                hw = self.measure_fn(device=device, **kwargs)
            best = hw if best is None else best_of(best, hw)
            if not why and last is not None and agree(last, hw):
                trusted = replace(best_of(last, hw), source="measured", notes=hw.notes.split("; measured under")[0])
                self.save(trusted)
                return trusted
            last = hw
            if why and attempt + 1 < self.attempts:
                time.sleep(BUSY_WAIT_S)
                why = ""
        why = why or "passes disagreed by more than {:.0%}".format(TOLERANCE)
        warnings.warn(f"hardware profile of {device} is provisional ({why}): used for this run, not cached; "
                      f"plans may be off until a run calibrates it or `klotski profile` runs on a quiet machine",
                      stacklevel=2)
        return replace(best, source=f"measured ({PROVISIONAL})", notes=f"{best.notes}; provisional: {why}")

    def feed_back(self, hw: HardwareProfile, observations, dtype: str) -> HardwareProfile | None:
        """Fit ``hw`` to a run's ``(op, seconds)`` observations and cache the result (unless the run was timed
        under the interpreter or ``hw`` is a preset). Returns the calibrated profile, or None.

        A profile that mispredicts the run's total op time by more than :data:`MISPREDICT` is suspect (measured
        under load, say): it is measured again first. A rate the run cannot identify (at the measured rate its
        term explains less than :data:`IDENTIFIED` of the time, e.g. the FLOPs of a tiny model, or the bytes of
        its small copies) keeps the measured value instead of the fit's (:func:`keep_identified`), so a small
        run never teaches a large model's plan a wrong rate."""
        from klotski.calibration import calibrate
        from klotski.costs import op_seconds

        if interpreter_on() or hw.source == "preset" or not observations:
            return None
        predicted = sum(op_seconds(op, hw, dtype) for op, _ in observations)
        measured = sum(seconds for _, seconds in observations)
        base = hw
        if measured > 0 and not 1 / MISPREDICT <= predicted / measured <= MISPREDICT:
            base = self.measure(hw.device)
        cal = keep_identified(base, calibrate(base, observations, dtype=dtype), observations, dtype)
        source = base.source.replace(f" ({PROVISIONAL})", "").split("+calibrated")[0]
        cal = replace(cal, source=f"{source}+calibrated",
                      notes=(base.notes.split("; calibrated")[0] + f"; calibrated on {len(observations)} ops of "
                             f"a run").lstrip("; "))
        self.save(cal)
        return cal


MISPREDICT = 3.0  # a profile off by more than 3x on a run's total op time is measured again
IDENTIFIED = 0.25  # a fitted term must explain this share of the measured compute time to replace the base


def keep_identified(base: HardwareProfile, cal: HardwareProfile, observations,
                    dtype: str = "bfloat16") -> HardwareProfile:
    """``cal`` with each term the run could not identify reverted to ``base``'s: the device compute terms
    (matmul rate, attention rate, per-call overhead, memory bandwidth) and each link's bandwidth (h2d, d2h,
    disk). Each term is judged on its own, at the base's value: it is identified when, at the base's rate, it
    accounts for at least :data:`IDENTIFIED` of the run's measured time (of its compute ops, or of the link's
    copies). Judging at the fitted value would be circular: a joint fit can make any term explain a run by
    moving it far from the measurement (the demo's tiny model, whose ops and copies are fixed costs, fitted
    matmuls 127x and attention 10^4x below the measured rates and the d2h link 1000x, and a plan for a real
    model then priced every FLOP at that). When a compute term goes back, the per-call overhead (the cost
    model's term for fixed costs: dispatch, launches, small kernels) takes the time it had explained, so the
    profile still sums to the run's compute time and a larger model's FLOPs are priced at the measured rates;
    likewise the per-copy latency takes the copy time of a reverted link. In CPU mode the CPU's fields follow
    the device's (one processor: :func:`klotski.calibration.same_processor`)."""
    from klotski.calibration import fit_kind_costs, same_processor
    from klotski.costs import op_timer

    one_processor = base.device == "cpu"
    changes = {}
    short, count = 0.0, 0  # the reverted links' copy time their bandwidth and latency do not explain
    for link, field in (("h2d", "h2d_bandwidth"), ("d2h", "d2h_bandwidth"), ("disk", "disk_bandwidth")):
        copies = [(op.bytes, s) for op, s in observations if op.link == link and op.bytes > 0 and s > 0]
        nbytes, seconds = sum(b for b, _ in copies), sum(s for _, s in copies)
        if copies and getattr(base, field) > 0 and nbytes / getattr(base, field) < IDENTIFIED * seconds:
            changes[field] = getattr(base, field)
            short += seconds - len(copies) * cal.transfer_latency_s - nbytes / changes[field]
            count += len(copies)
    if short > 0:  # small copies' fixed cost: the per-copy latency takes it (as the overhead does for compute)
        changes["transfer_latency_s"] = cal.transfer_latency_s + short / count
    rows = [(op, s) for op, s in observations
            if op.link is None and op.kind != "release" and (one_processor or op.device != "cpu") and s > 0]
    seconds = sum(s for _, s in rows)
    if not rows or seconds <= 0:
        return replace(cal, **changes) if changes else cal
    flops = sum(op.flops for op, _ in rows)
    score_flops = sum(op.score_flops for op, _ in rows)
    calls = sum(max(1, op.calls) for op, _ in rows)
    nbytes = sum(op.bytes for op, _ in rows)
    reverted = {}
    # (a base without a figure for a term -- 0 -- cannot say; the fit stands)
    peak = max(base.matmul_flops.values(), default=0.0)
    if peak > 0 and flops / peak < IDENTIFIED * seconds:
        reverted["matmul_flops"] = dict(base.matmul_flops)
    if base.attention_flops > 0 and score_flops / base.attention_flops < IDENTIFIED * seconds:
        reverted["attention_flops"] = base.attention_flops
    if base.device_mem_bandwidth > 0 and nbytes / base.device_mem_bandwidth < IDENTIFIED * seconds:
        reverted["device_mem_bandwidth"] = base.device_mem_bandwidth
    if calls * base.op_overhead_s < IDENTIFIED * seconds:
        reverted["op_overhead_s"] = base.op_overhead_s
    if reverted:  # the per-call overhead (the model's fixed costs) takes the time the reverted terms explained
        kept = replace(cal, kind_costs={}, cpu_kind_costs={}, **same_processor(base, reverted))
        timer = op_timer(kept, dtype)
        short = seconds - sum(timer(op) for op, _ in rows)
        if short > 0:
            reverted["op_overhead_s"] = kept.op_overhead_s + short / calls
    changes = same_processor(base, {**changes, **reverted})
    if not changes:
        return cal
    return fit_kind_costs(replace(cal, **changes), observations, dtype)  # refitted on the terms kept


__all__ = ["IDENTIFIED", "MISPREDICT", "PROVISIONAL", "TOLERANCE", "keep_identified", "ProfileCache", "agree",
           "best_of", "interpreter_on", "is_provisional"]
