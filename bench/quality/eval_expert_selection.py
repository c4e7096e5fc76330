"""Quality and expert traffic of batch-aware expert selection (klotski.model.expert_selection) against
aggressiveness, on the trained tiny MoE over held-out text, through the offloaded runtime.

One offloaded ``LLM`` (policy, budgets and group shape fixed: every row runs the same plan and placement)
runs ``B = num_batches x batch_size`` windows of the held-out split of ``train_tiny_moe.py``'s corpus
(spread evenly over it), each ``<s>`` + ``--prompt-len`` tokens of prefill then ``--decode-steps`` teacher-forced
decode steps (the true next token fed back: every step is a real decode step with a batch of B tokens). Per
selection setting (the executor's ``compute.selection`` switched between rows; the prefetch table restored
to the same learned state before each row):

* ``ppl``: perplexity of the held-out tokens the decode steps predict (prefill predictions are exact and
  left out), and its change against exact routing;
* ``argmax agree``: teacher-forced next-token argmax equal to exact routing's, per position;
* ``greedy agree``: free-running greedy decoding of ``--greedy-tokens`` from the same prompts, positions equal
  to exact routing's greedy tokens;
* ``distinct``: distinct experts per MoE layer per decode step (the union over the step's micro-batches;
  mean over layers), as the runtime's metrics count them;
* ``expert bytes/step``: routed-expert bytes loaded (host or disk -> device pool) per decode step, from the
  runtime's trace, and the loads behind them (those the prefetcher issued before the gate in brackets); every
  counted load is checked against the expert's home: a GPU-resident expert counted as loaded is reported;
* ``top-1 distinct``: the union of the router's top-1 experts per layer per decode step (non-resident ones in
  brackets), the floor no rule that keeps every token's top-1 can go below; ``chosen non-resident``: the
  experts the step's (selected) routing needs loaded, per layer.

The summary under the table gives the top-1 floor in bytes, loads needed vs loaded, and the two targets of
the feature (>= 25 % fewer expert bytes per decode step within 1 % perplexity; offload-aware >= 10 % fewer than
plain Lynx at the same quality). ``--hardware`` plans on a fixed profile (a preset such as ``rtx3090``), so the
placement does not move with this machine's refitted profile; under a budget that makes part of each layer's
experts GPU-resident, the offload-aware variant has resident experts to prefer.

Prefill logits of every row are checked against exact routing's (largest difference in the table; selection
never touches prefill). The exact row runs "lynx:0" (exact routing, the selection counters on), checked against
"off": the offloaded runtime runs the cold experts whose loads have arrived as one grouped call, so how a
token's expert outputs are summed into the fp32 accumulator depends on load timing and logits of the same
routing can differ in the last bits between runs (up to 6e-7 seen on a 32-expert model; 0 on the 8-expert
one). Differences up to ``RUN_NOISE_ATOL`` are accepted and reported, with "off" vs "lynx:0" agreement as the
run-to-run noise of the quality columns.

    python bench/quality/eval_expert_selection.py --model klotski/assets/tiny_moe
    python bench/quality/eval_expert_selection.py --hardware rtx3090 --gpu-memory 48MiB --cpu-memory 64MiB \
        --num-batches 1 --batch-size 16 --decode-steps 96     # batch 16, 4 of 8 experts per layer resident

``--prefetch-widths 0,1,2`` runs every setting at those prefetch widths too (hot experts per MoE layer; the
planner searches the same narrower widths when selection is on, ``klotski.planner.selection_widths``): rows are
labelled ``<setting>@w<width>``, each mode's cheapest row is taken over widths and settings, and "vs exact" is
against exact routing at its cheapest width.

``--window-shift 0.5`` takes a second, disjoint sample of the held-out text; ``selection_targets.py`` pools
the JSONs of several samples before judging the targets.

Writes ``bench/results/<date>-expert-selection.{json,md}`` and a plot ``...-expert-selection.png`` (skipped,
with a message, when matplotlib is not installed).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_tiny_moe import encode_stream, split_corpus  # noqa: E402

from klotski import LLM  # noqa: E402
from klotski.hardware import get_hardware  # noqa: E402
from klotski.model.expert_selection import ExpertSelection  # noqa: E402

from selection_report import exact_bytes, floor_and_targets, plot, write_atomic  # noqa: E402

EXPERT_LOAD = re.compile(r"^L\d+ e\d+$")  # span names of routed-expert loads (klotski.runtime.loads)
GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
RUN_NOISE_ATOL = 1e-4  # largest prefill logit difference accepted between runs of the same routing


def windows(stream: torch.Tensor, count: int, length: int, bos: int, shift: float = 0.0) -> torch.Tensor:
    """``count`` windows of ``<s>`` + length - 1 tokens spread evenly over ``stream`` -> [count, length]; window
    i starts at ``(i + shift) * stride`` (``shift`` in [0, 1): another sample of the same text, disjoint from
    shift 0's when ``shift * stride >= length``)."""
    step = length - 1
    if stream.numel() < count * step:
        raise ValueError(f"held-out text has {stream.numel()} tokens, fewer than {count} windows x {step}")
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"window shift must be in [0, 1), got {shift}")
    stride = (stream.numel() - step) // count
    starts = [int((i + shift) * stride) for i in range(count)]
    if starts[-1] + step > stream.numel():
        raise ValueError(f"window shift {shift}: the last window would end past the held-out text")
    rows = [[bos] + stream[s: s + step].tolist() for s in starts]
    return torch.tensor(rows, dtype=torch.long)


def expert_loads(ex, since: int) -> tuple[int, int, int, int]:
    """Routed-expert bytes loaded since span ``since`` -> (bytes, loads of GPU-resident experts, loads, of them
    prefetched: issued on the "prefetch" lane before the gate, from the prefetch table's prediction). Resident
    experts are served from their permanent slot and must never appear as loads: the second count is 0 unless
    the accounting (or the runtime) counts a resident expert as loaded."""
    moved, resident, count, prefetched = 0, 0, 0, 0
    for lane, name, _, _, a in ex.tracer.spans[since:]:
        if EXPERT_LOAD.match(name):
            moved += a.get("bytes", 0)
            count += 1
            prefetched += lane == "prefetch"
            layer, e = (int(x[1:]) for x in name.split())
            resident += ex.w.expert_home[(layer, e)][0] == "gpu"
    return moved, resident, count, prefetched


class Top1Floor:
    """Eval instrumentation of ``ex.compute.selection_stats.record`` (the package is not changed): per decode
    step and MoE layer, the union of the router's top-1 experts (column 0 of the exact ids) over the step's
    micro-batches, which no rule that keeps every token's top-1 can drop; and how many of them are
    GPU-resident (cost no load)."""

    def __init__(self, ex):
        self.ex, self.steps, self.chosen = ex, {}, {}
        stats = ex.compute.selection_stats
        self._inner = stats.record

        def record(layer, exact_ids, chosen_ids, remapped):
            key = (ex.compute._step_no, layer)
            self.steps.setdefault(key, set()).update(exact_ids[:, 0].tolist())
            self.chosen.setdefault(key, set()).update(chosen_ids.flatten().tolist())
            return self._inner(layer, exact_ids, chosen_ids, remapped)

        stats.record = record

    def reset(self) -> None:
        self.steps, self.chosen = {}, {}

    def summary(self) -> dict:
        """Mean over (decode step, layer) of distinct top-1 experts and of the non-resident ones among them."""
        if not self.steps:
            return {"top1_distinct": float("nan"), "top1_nonresident": float("nan"),
                    "chosen_nonresident": float("nan")}
        home = self.ex.w.expert_home
        n = len(self.steps)

        def nonresident(sets):
            return sum(sum(home[(lay, e)][0] != "gpu" for e in s) for (_, lay), s in sets.items()) / n

        return {"top1_distinct": sum(len(s) for s in self.steps.values()) / n,
                "top1_nonresident": nonresident(self.steps), "chosen_nonresident": nonresident(self.chosen)}


@torch.inference_mode()
def run_row(ex, seqs: torch.Tensor, prompt_len: int, steps: int, greedy: int, floor: Top1Floor) -> dict:
    """Teacher-forced decode over ``seqs`` [B, 1 + prompt_len + steps + 1], then free-running greedy."""
    B = seqs.shape[0]
    pad = torch.zeros(B, dtype=torch.long)
    P = 1 + prompt_len
    ex.reset_metrics()
    floor.reset()
    resident_loads, loads, prefetched = 0, 0, 0
    cache = ex.new_cache(B, P + steps, pad)
    prefill = ex.forward(seqs[:, :P], cache).float().cpu()
    nll, argmax, per_step = 0.0, [], []
    for j in range(steps):
        n0 = len(ex.tracer.spans)
        logits = ex.forward(seqs[:, P + j: P + j + 1], cache).float().cpu()
        moved, resident, count, pre = expert_loads(ex, n0)
        per_step.append(moved)
        resident_loads += resident
        loads += count
        prefetched += pre
        target = seqs[:, P + j + 1]
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        argmax.append(logits.argmax(-1))
    metrics = ex.metrics
    top1 = floor.summary()
    cache = ex.new_cache(B, P + greedy, pad)
    logits = ex.forward(seqs[:, :P], cache)
    out = []
    for _ in range(greedy):
        nxt = logits.argmax(-1).cpu()
        out.append(nxt)
        logits = ex.forward(nxt[:, None], cache)
    dist = metrics.get("selection_distinct_per_layer", {})
    exact = metrics.get("selection_distinct_exact_per_layer", {})
    return {"prefill": prefill, "nll": nll, "tokens": B * steps, "argmax": torch.stack(argmax, 1),
            "greedy": torch.stack(out, 1), "expert_bytes_per_step": sum(per_step) / max(1, steps),
            "distinct_per_layer": dist, "distinct": sum(dist.values()) / max(1, len(dist)),
            "distinct_router": sum(exact.values()) / max(1, len(exact)),
            "remapped_fraction": metrics.get("selection_remapped_fraction", 0.0),
            "resident_loads": resident_loads, "expert_loads_per_step": loads / max(1, steps),
            "prefetch_loads_per_step": prefetched / max(1, steps),
            "bytes_per_load": sum(per_step) / loads if loads else 0.0, **top1}


def prefetch_widths(text: str) -> list[int]:
    """``--prefetch-widths``: "plan" (the plan's width only) or comma-separated widths >= 0 -> [widths]."""
    if text.strip() == "plan":
        return []
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = [-1]
    if any(w < 0 for w in widths):
        raise argparse.ArgumentTypeError(f"wants 'plan' or comma-separated widths >= 0 (hot experts per MoE layer), "
                                         f"got {text!r}")
    return widths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="klotski/assets/tiny_moe")
    p.add_argument("--modes", default="lynx,lynx-offload")
    p.add_argument("--grid", default=",".join(map(str, GRID)), help="aggressiveness values per mode")
    p.add_argument("--policy", default="klotski")
    p.add_argument("--gpu-memory", default="16MiB")
    p.add_argument("--cpu-memory", default="32MiB")
    p.add_argument("--hardware", default=None,
                   help="hardware preset name or profile JSON to plan with (fixed, so the placement is reproducible; "
                        "default: this machine's cached profile)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--greedy-tokens", type=int, default=24)
    p.add_argument("--window-shift", type=float, default=0.0,
                   help="start window i at (i + shift) x stride of the held-out text (0.5: a second, disjoint sample)")
    p.add_argument("--prefetch-widths", default="plan", type=prefetch_widths,
                   help="hot experts prefetched per MoE layer, comma-separated (e.g. 0,1,2,4): every setting runs at "
                        "each width (the plan's width is always one of them); 'plan' (default): the plan's only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    p.add_argument("--tag", default=time.strftime("%Y%m%d") + "-expert-selection")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    report = json.loads((Path(args.model) / "train_report.json").read_text())
    targs = report["args"]
    _, val_texts, corpus = split_corpus(Path(report["corpus"]["root"]), targs["val_fraction"], targs["train_chars"])
    if corpus["sha256"] != report["corpus"]["sha256"]:
        print("warning: the corpus differs from the one the model was trained on", file=sys.stderr)
    hardware = get_hardware(args.hardware) if args.hardware else None
    llm = LLM(args.model, device="cpu", policy=args.policy, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
              num_batches=args.num_batches, batch_size=args.batch_size, hardware=hardware)
    try:
        spec, ex = llm.spec, llm.executor
        B = args.num_batches * args.batch_size
        bos = spec.bos_token_id if spec.bos_token_id is not None else 0
        seqs = windows(encode_stream(llm.tokenizer._tok, val_texts), B, 2 + args.prompt_len + args.decode_steps, bos,
                       args.window_shift)
        widths = [ex.num_hot] + sorted(set(args.prefetch_widths) - {ex.num_hot})
        grid = [f"{m}:{a}" for m in args.modes.split(",") for a in args.grid.split(",")]
        runs = [(widths[0], "off")] + [(w, s) for w in widths for s in ["lynx:0"] + grid]
        floor = Top1Floor(ex)
        # warm-up: the prefetch table learns this text's routing
        run_row(ex, seqs, args.prompt_len, min(4, args.decode_steps), 2, floor)
        table = copy.deepcopy(ex.prefetcher.__dict__) if ex.prefetcher is not None else None
        res = {}
        for w, s in runs:
            ex.num_hot = w  # the interpreter reads the prefetch width per step
            ex.compute.selection = ExpertSelection.parse(s)
            if table is not None:
                ex.prefetcher.__dict__.update(copy.deepcopy(table))
            res[(w, s)] = run_row(ex, seqs, args.prompt_len, args.decode_steps, args.greedy_tokens, floor)
            print(f"{s} (prefetch width {w}): done ({time.time() - t0:.0f} s)", flush=True)
        ex.num_hot = widths[0]
        placement = ex.layout.describe(spec.num_experts)
    finally:
        llm.close()
    off, ref = res.pop((widths[0], "off")), res[(widths[0], "lynx:0")]
    noise = {"prefill_max_diff": float((off["prefill"] - ref["prefill"]).abs().max()),
             "ppl_change": math.exp((off["nll"] - ref["nll"]) / ref["tokens"]) - 1,
             "argmax_agree": float((off["argmax"] == ref["argmax"]).float().mean()),
             "greedy_agree": float((off["greedy"] == ref["greedy"]).float().mean())}
    if noise["prefill_max_diff"] > RUN_NOISE_ATOL or abs(noise["ppl_change"]) > 1e-5:
        raise AssertionError(f"lynx:0 must be exact routing: against 'off' its prefill logits differ by up to "
                             f"{noise['prefill_max_diff']:.3g} (accepted {RUN_NOISE_ATOL:g}), perplexity by "
                             f"{100 * noise['ppl_change']:+.5f}%")
    base_ppl = math.exp(ref["nll"] / ref["tokens"])
    rows = []
    for (w, s), r in res.items():
        sel = ExpertSelection.parse(s)
        ppl = math.exp(r["nll"] / r["tokens"])
        label = "exact" if s == "lynx:0" else s
        if len(widths) > 1 and (w, s) != (widths[0], "lynx:0"):  # "exact": exact routing at the plan's width
            label += f"@w{w}"
        rows.append({"setting": label, "mode": "exact" if s == "lynx:0" else sel.mode, "prefetch_width": w,
                     "aggressiveness": sel.aggressiveness, "ppl": ppl, "ppl_change": ppl / base_ppl - 1,
                     "argmax_agree": float((r["argmax"] == ref["argmax"]).float().mean()),
                     "greedy_agree": float((r["greedy"] == ref["greedy"]).float().mean()),
                     "distinct": r["distinct"], "distinct_router": r["distinct_router"],
                     "distinct_per_layer": r["distinct_per_layer"], "remapped_fraction": r["remapped_fraction"],
                     "expert_bytes_per_step": r["expert_bytes_per_step"],
                     "expert_loads_per_step": r["expert_loads_per_step"], "resident_loads": r["resident_loads"],
                     "top1_distinct": r["top1_distinct"], "top1_nonresident": r["top1_nonresident"],
                     "chosen_nonresident": r["chosen_nonresident"],
                     "prefetch_loads_per_step": r["prefetch_loads_per_step"],
                     "prefill_identical": bool(torch.equal(r["prefill"], ref["prefill"])),
                     "prefill_max_diff": float((r["prefill"] - ref["prefill"]).abs().max())})
    bad = [r["setting"] for r in rows if r["prefill_max_diff"] > RUN_NOISE_ATOL]
    if bad:
        raise AssertionError(f"prefill logits changed with expert selection on (> {RUN_NOISE_ATOL:g}): {bad}")
    # against the cheapest exact row over the widths run (exact routing at its best prefetch width)
    baseline = exact_bytes(rows)
    for r in rows:
        r["bytes_vs_exact"] = r["expert_bytes_per_step"] / baseline - 1 if baseline else 0.0
    best = {}
    for mode in args.modes.split(","):
        for w in widths:
            ok = [r for r in rows if r["mode"] == mode and r["prefetch_width"] == w and r["ppl_change"] <= 0.01]
            if ok:
                key = mode + (f"@w{w}" if len(widths) > 1 else "")
                best[key] = max(ok, key=lambda r: r["aggressiveness"])["setting"]
    summary = floor_and_targets(rows, ref, spec, baseline)
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    head = ("| setting | ppl | ppl change | argmax agree | greedy agree | distinct experts / layer / step | "
            "top-1 distinct (non-resident) | chosen non-resident | remapped | expert loads / step (prefetched) | expert KiB / decode step | vs exact | "
            "prefill max diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['setting']} | {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% | {r['argmax_agree']:.3f} | "
             f"{r['greedy_agree']:.3f} | {r['distinct']:.2f} | {r['top1_distinct']:.2f} ({r['top1_nonresident']:.2f}) | "
             f"{r['chosen_nonresident']:.2f} | {100 * r['remapped_fraction']:.1f}% | "
             f"{r['expert_loads_per_step']:.1f} ({r['prefetch_loads_per_step']:.1f}) | "
             f"{r['expert_bytes_per_step'] / 1024:.0f} | {100 * r['bytes_vs_exact']:+.1f}% | "
             f"{r['prefill_max_diff']:.2g} |" for r in rows]
    md = (f"# Expert selection on {args.model}\n\n`{cmd}`\n\npolicy {args.policy}, planned for {args.hardware or 'this machine'}, gpu {args.gpu_memory}, cpu "
          f"{args.cpu_memory}, {args.num_batches} x {args.batch_size} sequences, placement {placement}; "
          f"{B} held-out windows of {args.prompt_len} prefill tokens + {args.decode_steps} teacher-forced decode "
          f"steps ({ref['tokens']} predicted tokens), {args.greedy_tokens} greedy tokens. Distinct experts: mean over "
          f"the {spec.num_experts}-expert MoE layers of the union over the step's micro-batches. Prefetch width: "
          f"hot experts prefetched per MoE layer before the gate; the plan's is {widths[0]}"
          + (f", every setting also runs at {', '.join(map(str, widths[1:]))} (`@w<width>`); 'vs exact' is against "
             f"the cheapest exact row" if len(widths) > 1 else "") + ".\n\n"
          + head + "\n" + "\n".join(lines)
          + "\n\nLargest aggressiveness with perplexity cost <= 1%: "
          + (", ".join(f"{m}: {s}" for m, s in best.items()) or "none") + "\n\n"
          + f"Run-to-run noise (exact routing twice, 'off' vs 'lynx:0'): ppl {100 * noise['ppl_change']:+.5f}%, argmax "
          f"agree {noise['argmax_agree']:.3f}, greedy agree {noise['greedy_agree']:.3f}, prefill logits differ by up to "
          f"{noise['prefill_max_diff']:.2g}.\n\n" + summary["markdown"])
    print(md)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.tag)
    write_atomic(base + ".md", md)
    write_atomic(base + ".json", json.dumps({"command": cmd, "model": args.model, "args": vars(args),
                                             "placement": placement, "prefetch_widths": widths, "corpus": corpus,
                                             "rows": rows,
                                             "best_within_1pct": best, "run_noise": noise,
                                             **{k: v for k, v in summary.items() if k != "markdown"}, "seconds": time.time() - t0}, indent=1))
    print(plot(rows, base + ".png"))
    print(f"wrote {os.path.normpath(base)}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
