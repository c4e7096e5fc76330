"""An exact fingerprint of what the planner simulates, to check that a speed-up of the simulator or the op
builders changes no prediction: every SimResult a few ``Planner.compare`` searches cache (makespan, busy time,
peak memory, every op's start / finish, bytes moved, resource time) and a few whole schedules' ops.

    python bench/sim/planner_fingerprint.py        # prints per-search seconds and digests, then FINAL <sha256>

Run it before and after a change (same interpreter): equal FINAL digests mean identical predictions.
"""
import hashlib
import time

from klotski.costs import ModelCosts
from klotski.hardware import PRESETS
from klotski.planner import Planner
from klotski.presets import model_config
from klotski.program.host import HostCompute
from klotski.schedule import Placement, StepShape, build_schedule
from klotski.simulate import simulate

SEARCHES = (("deepseek-v3", "t4", "off"), ("qwen3-30b-a3b", "t4", "off"), ("mixtral-8x7b", "rtx3090-pcie4", "search"),
            ("olmoe-1b-7b", "l4", "search"), ("deepseek-v2-lite", "a5000", "off"))


def result_text(r) -> str:
    return repr((r.makespan, sorted(r.busy.items()), sorted(r.peak_mem.items()), r.start, r.finish,
                 sorted(r.bytes_moved.items()), r.layers_simulated, sorted(r.resource_busy.items())))


def main() -> None:
    digest = hashlib.sha256()
    for model, hw, host in SEARCHES:
        t = time.time()
        planner = Planner(ModelCosts.from_config(model_config(model), name=model), PRESETS[hw], 512, 32, host=host)
        plans = planner.compare(("layerwise", "flexgen", "klotski"))
        digest.update(repr(sorted((k, repr(v)) for k, v in plans.items())).encode())
        for key in sorted(planner._cache, key=repr):
            value = planner._cache[key]
            digest.update(repr(key).encode())
            digest.update((result_text(value) if hasattr(value, "makespan") else repr(value)).encode())
        print(model, hw, host, f"{time.time() - t:.1f} s", digest.hexdigest()[:16], flush=True)
    costs = ModelCosts.from_config(model_config("olmoe-1b-7b"), name="olmoe-1b-7b")
    for policy in ("layerwise", "flexgen", "klotski"):
        for kv in ("gpu", "cpu"):  # KV on the host: attention and cold experts on the CPU
            sched = build_schedule(policy, costs, Placement(experts_gpu=8, experts_cpu=30, kv=kv),
                                   StepShape("decode", 16, 4, 1, 100, 200),
                                   host=HostCompute("cpu", "cpu", "all") if kv == "cpu" else None)
            digest.update(repr(sched.ops).encode())
            digest.update(repr((sched.static_mem, sched.num_layers, sched.layer_last_compute)).encode())
            digest.update(result_text(simulate(sched, PRESETS["t4"])).encode())
    print("FINAL", digest.hexdigest())


if __name__ == "__main__":
    main()
