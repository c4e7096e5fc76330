"""One offloaded run's lifecycle: plan, build, (re-plan,) warm up, run, metrics, close.

:class:`OffloadedSession` owns everything an offloaded ``LLM`` holds between calls: the checked options
(:class:`~klotski.runtime.build.RunConfig`), the plan the current executor runs
(:class:`~klotski.runtime.build.RunPlan`), the executor, the correlation prefetcher (shared across
re-plans, its table loaded from and saved to ``offload_dir``), the hardware profile predictions are made on,
and the last run's workload. The engine drives it through the session protocol (:mod:`klotski.session`):
``prepare`` before a ``generate`` call, ``executor`` for the forwards, ``finish`` after, ``metrics``,
``close``.

Re-planning is transactional: the new plan is made first (no allocation; a :class:`BudgetError` leaves the
session as it was), then the new executor is built, and only then is the old one closed. A build that fails
or is interrupted (KeyboardInterrupt included) stops whatever it started and leaves the old executor in
place. On CUDA, when the device cannot hold both executors at once, the old one is closed first and rebuilt
from its plan if the new one still cannot be built.
"""
from __future__ import annotations

import gc
import os
import time
import warnings
from dataclasses import replace

import torch

from klotski.prefetch import TABLE_NAME, CorrelationPrefetcher
from klotski.runtime.build import RunConfig, RunPlan, build_executor, plan_run
from klotski.runtime.executor import OffloadedExecutor
from klotski.runtime.loader import WAIT_TIMEOUT_S
from klotski.runtime.planning import DEFAULT_WORKLOAD, REPLAN_FACTOR, calibrate_from_run, prediction_metrics

PREFETCH_TABLE = TABLE_NAME  # the learned table's file name in offload_dir (or shipped in a model directory)
WARMUP_TOKENS = 32


def _load_table(prefetcher: CorrelationPrefetcher, dirs, identity: str | None) -> str | None:
    """Load the first readable prefetch table of ``dirs`` learned on this checkpoint; a damaged table or one
    of another checkpoint is skipped with a warning (it is relearned and overwritten by the next save)."""
    for d in dirs:
        path = os.path.join(d, TABLE_NAME) if d else None
        if path and os.path.isfile(path):
            try:
                prefetcher.load(path, identity=identity)
                return path
            except ValueError as e:
                warnings.warn(f"ignoring the prefetch table: {e}; it is learned again", stacklevel=3)
    return None


def _far(a: float, b: float) -> bool:
    return max(a, b) > REPLAN_FACTOR * min(a, b)


class OffloadedSession:
    """An offloaded model ready to run under ``policy`` ("layerwise" | "flexgen" | "klotski").

    ``gpu_memory`` / ``cpu_memory``: bytes or strings with a unit ("24GiB"); None = unlimited.
    ``offload_dir``: the disk tier (the packed expert store, converted on first use, and the prefetch table);
    None streams disk-tier weights from the checkpoint files. ``num_batches`` / ``batch_size``: "auto" = the
    planner's choice (a very different workload then re-plans), an int fixes it. ``kv="cpu"`` forces the KV
    cache into host memory. ``hardware``: a HardwareProfile (default: this machine's cached profile).
    ``workload``: (prompt tokens, generated tokens) per sequence planned for before the first ``prepare``.
    ``rebuild_store``: replace a store of another checkpoint found in ``offload_dir`` (refused by default).
    ``quantization="int4"``: routed experts from an int4 store in ``offload_dir`` (:mod:`klotski.runtime.int4`).
    ``prefetch``: how klotski predicts the next layer's hot experts: "table" (the correlation table) or
    "lookahead" (also the next layer's router applied to the current residual stream, per layer whichever has
    hit more so far; :mod:`klotski.lookahead`). Either only changes what loads early, never the tokens.
    ``expert_selection``: "off" (default) | "lynx:A" | "lynx-offload:A" on decode steps
    (:mod:`klotski.model.expert_selection`, applied in ``Compute.gate``; the planner counts its fewer experts).
    ``host_compute``: "auto" (on CUDA the planner chooses attention per phase and cold experts on the CPU; off
    in CPU mode), "off", or a fixed :class:`klotski.program.host.HostCompute` or its text form
    (:func:`klotski.program.host.parse_host_compute`).
    """

    can_trace = True

    def __init__(self, weights, device, dtype, policy: str, gpu_memory=None, cpu_memory=None, offload_dir=None,
                 num_batches="auto", batch_size="auto", experts_fn=None, kv: str = "auto", hardware=None,
                 workload: tuple[int, int] = DEFAULT_WORKLOAD, prefetcher: CorrelationPrefetcher | None = None,
                 timeout_s: float | None = WAIT_TIMEOUT_S, rebuild_store: bool = False,
                 quantization: str | None = None, prefetch: str = "table", expert_selection=None,
                 host_compute="auto"):
        self.config = RunConfig.of(weights, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, num_batches,
                                   batch_size, experts_fn, kv, hardware, timeout_s, rebuild_store, quantization,
                                   prefetch, expert_selection=expert_selection, host_compute=host_compute)
        spec = weights.spec
        self.prefetcher, self.table_path = prefetcher, None
        if prefetcher is None and spec.moe_layers:
            self.prefetcher = CorrelationPrefetcher(spec.num_layers, spec.num_experts)
            ident = weights.index.identity()["fingerprint"] if self.config.offload_dir is not None else None
            self.table_path = _load_table(self.prefetcher, (self.config.offload_dir, weights.index.model_dir), ident)
        self.executor: OffloadedExecutor | None = None
        self.run_plan: RunPlan = plan_run(self.config, workload)
        self.hardware = self.run_plan.hardware  # what predictions (and re-plans) use; calibrate() refits it
        self.executor = build_executor(self.config, self.run_plan, self.prefetcher)
        self.warmup_s: float | None = None
        self.run_workload: dict | None = None
        self._prediction: dict = {}
        self._fed_back = hardware is not None  # an explicit profile is the caller's: never refitted into the cache
        self._replan_due = False  # the first run's feedback moved the prediction past REPLAN_FACTOR

    # ---- what the engine reads -------------------------------------------------------------------------
    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def group_size(self) -> int:
        """Sequences per batch group: the engine's chunk size for one generate_batch."""
        return self._live().group_size

    @property
    def plan(self):
        return self.run_plan.plan

    def _live(self) -> OffloadedExecutor:
        if self.executor is None:
            raise RuntimeError("this offloaded session is closed")
        return self.executor

    # ---- lifecycle -------------------------------------------------------------------------------------
    def prepare(self, prompt_token_ids: list[list[int]], max_tokens: list[int]) -> None:
        """Before a generate call: re-plan when the workload differs from the planned one by more than
        ``REPLAN_FACTOR``, or when the first run's feedback changed the profile so much that it predicts the
        plan more than ``REPLAN_FACTOR`` off (the plan was made on rates that did not hold: a fresh cache's
        measurement mispredicted CPU-mode runs 3-4x); only when the group shape is "auto". Then warm the
        prefetcher up when it has no table yet (klotski), and note the workload the prediction is made for."""
        self._live()
        prompt = max(1, round(sum(len(p) for p in prompt_token_ids) / max(1, len(prompt_token_ids))))
        gen = max(1, max(max_tokens, default=1))
        p0, g0 = self.run_plan.workload
        if self.config.auto and (self._replan_due or _far(prompt, p0) or _far(gen, g0)):
            self.replan((prompt, gen))
        self.warmup_s = None
        if self.prefetcher is not None and self.prefetcher.popularity.sum() == 0 and self.policy == "klotski":
            self.warmup_s = self.warm_up(prompt_token_ids)
        self.run_workload = {"prompt_len": prompt, "gen_len": gen, "sequences": len(prompt_token_ids)}

    def replan(self, workload: tuple[int, int]) -> None:
        """Plan for ``workload`` and swap in a new executor; on any failure the current one stays."""
        rp = plan_run(self.config, workload, self.hardware)  # BudgetError here: nothing has changed
        new = self._build(rp)
        old, self.executor, self.run_plan, self._prediction = self.executor, new, rp, {}
        self._replan_due = False
        if old is not None:
            old.close()

    def _build(self, rp: RunPlan) -> OffloadedExecutor:
        try:
            return build_executor(self.config, rp, self.prefetcher)
        except torch.OutOfMemoryError:
            if self.config.device.type != "cuda" or self.executor is None:
                raise
        # the device cannot hold two executors: free the old one, build the new, else rebuild the old
        old, self.executor = self.executor, None
        old.close()
        del old
        gc.collect()
        torch.cuda.empty_cache()
        try:
            return build_executor(self.config, rp, self.prefetcher)
        except BaseException:
            self.executor = build_executor(self.config, self.run_plan, self.prefetcher)
            raise

    def warm_up(self, prompt_token_ids: list[list[int]], max_tokens: int = WARMUP_TOKENS) -> float:
        """The warm-up run: one prefill of (up to) a batch group's prompts, truncated to ``max_tokens``,
        through the executor so the prefetcher records routing (popularity and the layer-to-layer table); it
        is updated online afterwards. Returns its seconds (reported as ``warmup_s``; not part of a run)."""
        from klotski.generation import left_pad

        ex = self._live()
        t0 = time.perf_counter()
        chunk = [p[:max_tokens] for p in prompt_token_ids[: ex.group_size]]
        batch, pad = left_pad(chunk)
        cache = ex.new_cache(len(chunk), batch.shape[1], pad)
        ex.forward(batch, cache)
        return time.perf_counter() - t0

    def reset_metrics(self) -> None:
        self._live().reset_metrics()

    def finish(self) -> str | None:
        """After a generate call: the first run of the session feeds its per-op timings back into this machine's
        profile (:mod:`klotski.profile_cache`: a poisoned profile lasts one run; when the refitted profile
        predicts this run more than ``REPLAN_FACTOR`` off the one it was planned on, the next generate re-plans
        on it, :meth:`prepare`), then the prefetch table is saved in ``offload_dir`` (reloaded by the next
        session, which also reads one shipped in the model directory; the model directory itself is never
        written). Returns the table's path, or None (no offload_dir, or the save failed: a warning says why;
        side files never cost the outputs)."""
        ex = self._live()
        if not self._fed_back:
            self._fed_back = True
            if ex.tracer.observations():
                auto = self.config.auto  # a fixed group shape never re-plans: no prediction to compare
                before = self.metrics["predicted_tokens_per_s"] if auto else 0.0
                self.hardware, self._prediction = calibrate_from_run(ex, self.hardware), {}
                after = self.metrics["predicted_tokens_per_s"] if auto else 0.0
                self._replan_due = before > 0 and after > 0 and _far(before, after)
        if self.prefetcher is None or self.prefetcher.popularity.sum() == 0 or not self.config.offload_dir:
            return None
        return self.save_prefetch_table(self.config.offload_dir)

    def save_prefetch_table(self, directory: str) -> str | None:
        """Save the learned routing table (tagged with the checkpoint's fingerprint) in ``directory``; a failure
        (a full disk, a read-only directory) warns and returns None."""
        path = os.path.join(directory, TABLE_NAME)
        try:
            self.prefetcher.save(path, identity=self.config.weights.index.identity()["fingerprint"])
        except OSError as e:
            warnings.warn(f"could not save the prefetch table to {path}: {e.strerror or e}; the outputs are "
                          f"unaffected and the table is learned again next time", stacklevel=2)
            return None
        return path

    def close(self) -> None:
        """Stop the loader lanes and the disk reader and drop the placed weights (idempotent)."""
        ex, self.executor = self.executor, None
        if ex is not None:
            ex.close()

    # ---- metrics and traces ----------------------------------------------------------------------------
    @property
    def metrics(self) -> dict:
        """The executor's measurements plus the plan's prediction for the workload the last run had."""
        ex = self._live()
        out = ex.metrics
        key = None
        if self.run_workload:
            w = self.run_workload
            key = (w["prompt_len"], w["gen_len"], w["sequences"], ex.time["prefill_chunks"], id(self.hardware))
        if self._prediction.get("key") != key or key is None:
            # predicted for what runs: the executor's placement (its pools may have moved weights off the
            # device that the plan placed there), the plan's group shape and variant
            ran = replace(self.plan, placement=ex.layout.placement)
            values = prediction_metrics(ran, ex.costs, self.hardware, self.run_plan.workload, self.run_workload,
                                        ex.group_size, ex.time["prefill_chunks"], ex.spec.num_experts)
            if ran.placement != self.plan.placement:
                values["planned_placement"] = self.plan.placement.describe(ex.spec.num_experts)
            self._prediction = {"key": key, "values": values}
        out.update(self._prediction["values"])
        if self.warmup_s is not None:
            out["warmup_s"] = self.warmup_s
        return out

    def calibrate(self, base=None, save: bool = True):
        """Fit ``base`` (default: the profile this session plans with) to the last run's per-op timings
        (:func:`~klotski.runtime.planning.calibrate_from_run`; cached as this machine's profile when ``save``);
        later predictions and re-plans of this session use the result. Returns the calibrated profile."""
        cal = calibrate_from_run(self._live(), base or self.hardware, save=save)
        self.hardware, self._prediction = cal, {}
        return cal

    def write_trace(self, path: str) -> None:
        self._live().write_trace(path)

    def write_timeline(self, path: str) -> None:
        self._live().write_timeline(path)
