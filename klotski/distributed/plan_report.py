"""``klotski plan --devices G``: predicted routed-expert phase on G devices, FSE-DP vs expert parallelism vs
replicated offloading (:mod:`klotski.distributed.predict`), for one decode step and one prefill per device."""
from __future__ import annotations

from klotski.distributed.predict import STRATEGIES, LayerShape, predict_layer, sample_counts, zipf_popularity
from klotski.units import format_bytes

ZIPF_S = 1.2  # default routing skew when no routing statistics are given


def device_workloads(args) -> list[tuple[str, int]]:
    """(label, tokens per device): a decode step of ``--device-batch`` sequences, and their prefill."""
    b = args.device_batch
    return [(f"decode, {b} seq/device", b), (f"prefill, {b} x {args.prompt_len} tokens/device", b * args.prompt_len)]


def predictions(costs, hw, devices: int, workloads, routing=None, num_slices: int = 4, slots: int = 4,
                seed: int = 0) -> list[tuple[str, int, dict]]:
    """Per workload: (label, tokens per device, {strategy: prediction of one MoE layer}) with Zipf(1.2) routing or
    the first MoE layer's popularity in ``routing`` (:class:`klotski.routing_stats.RoutingStats`)."""
    spec = costs.spec
    layer = next(i for i, lc in enumerate(costs.layers) if lc.kind == "moe")
    popularity = (routing.layer_weights(layer) if routing is not None
                  else zipf_popularity(spec.num_experts, ZIPF_S))
    shape = LayerShape.from_costs(costs, layer)
    out = []
    for label, tokens in workloads:
        counts = sample_counts(popularity, devices, tokens, spec.top_k, seed)
        out.append((label, tokens, predict_layer(counts, shape, hw, num_slices, slots)))
    return out


def format_report(rows, moe_layers: int) -> str:
    head = (f"{'workload':<34} {'strategy':<16} {'layer ms':>9} {'step ms':>9} {'host/layer':>11} "
            f"{'d2d/layer':>11} {'host max/dev':>12}")
    lines = [head, "-" * len(head)]
    for label, _, preds in rows:
        for name in STRATEGIES:
            p = preds[name]
            lines.append(f"{label:<34} {name:<16} {p.step_s * 1e3:>9.2f} {p.step_s * moe_layers * 1e3:>9.1f} "
                         f"{format_bytes(p.host_bytes):>11} {format_bytes(p.d2d_bytes):>11} "
                         f"{format_bytes(max(p.host_bytes_per_device)):>12}")
    return "\n".join(lines)


def run_devices(args, costs, hw, routing=None) -> int:
    """Print the G-device comparison (``args.devices`` > 1)."""
    moe_layers = sum(lc.kind == "moe" for lc in costs.layers)
    print(f"devices   {args.devices} x {hw.device_name}: host link {hw.h2d_bandwidth / 1e9:.1f} GB/s each, "
          f"device-to-device {hw.d2d_bandwidth / 1e9:.1f} GB/s")
    print(f"routing   {'zipf(s=%g), sampled' % ZIPF_S if routing is None else routing.source}; every routed expert "
          f"streamed from host memory, {args.slices} slices per expert, {args.slots} slots per device; dense "
          f"weights resident on every device")
    rows = predictions(costs, hw, args.devices, device_workloads(args), routing, args.slices, args.slots)
    print("\npredicted routed-expert phase (one MoE layer; step = x %d MoE layers):" % moe_layers)
    print(format_report(rows, moe_layers))
    print("predictions from the cost model (klotski.distributed.predict), not measurements")
    return 0
