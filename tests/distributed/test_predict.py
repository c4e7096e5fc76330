"""Predicted routed-expert phase on G devices: FSE-DP vs expert parallelism vs replicated offloading."""
from dataclasses import replace

import numpy as np
import pytest

from klotski.cli import main
from klotski.costs import ModelCosts
from klotski.distributed.predict import LayerShape, predict_layer, sample_counts, zipf_popularity
from klotski.hardware import preset
from klotski.presets import model_config


def shape_of(model):
    costs = ModelCosts.from_config(model_config(model), name=model)
    return LayerShape.from_costs(costs), costs.spec


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zipf_two_devices_half_the_host_bytes_and_not_slower_than_expert_parallel(seed):
    """G = 2, Zipf(1.2) routing, a prefill of 4096 tokens per device, 128 experts top-8, H100 NVLink preset."""
    shape, spec = shape_of("qwen3-30b-a3b")
    counts = sample_counts(zipf_popularity(spec.num_experts, 1.2), 2, 4096, spec.top_k, seed)
    assert all(min(counts[0][e], counts[1][e]) > 0 for e in range(spec.num_experts))  # every expert on both
    p = predict_layer(counts, shape, preset("h100"))
    assert p["fse-dp"].host_bytes * 2 == p["replicated"].host_bytes
    assert p["fse-dp"].step_s <= p["expert-parallel"].step_s
    assert p["fse-dp"].step_s < p["replicated"].step_s


def test_low_batch_decode_fse_dp_beats_expert_parallel_on_average():
    """One token per device: few experts needed; FSE-DP splits each needed expert over both host links while
    expert parallelism loads it on its one owner."""
    shape, spec = shape_of("mixtral-8x7b")
    fse, ep = [], []
    for seed in range(16):
        p = predict_layer(sample_counts(zipf_popularity(8, 1.2), 2, 1, 2, seed), shape, preset("h100"))
        fse.append(p["fse-dp"].step_s)
        ep.append(p["expert-parallel"].step_s)
    assert np.mean(fse) < 0.9 * np.mean(ep)


def test_host_bytes_accounting():
    shape, spec = shape_of("mixtral-8x7b")
    counts = [[5, 0, 3, 0, 1, 0, 0, 2], [1, 4, 0, 0, 2, 0, 6, 0], [0, 0, 7, 0, 0, 0, 0, 1]]
    p = predict_layer(counts, shape, preset("a100"), num_slices=4, slots=3)
    needed = sum(any(row[e] for row in counts) for e in range(8))
    per_device = [sum(c > 0 for c in row) for row in counts]
    assert p["fse-dp"].host_bytes == p["expert-parallel"].host_bytes == needed * shape.expert_bytes
    assert p["replicated"].host_bytes == sum(per_device) * shape.expert_bytes
    assert p["replicated"].d2d_bytes == 0 < p["fse-dp"].d2d_bytes
    # every expert needed on both of 2 devices: the balanced loaders split the host bytes evenly
    even = predict_layer([[3] * 8, [1] * 8], shape, preset("a100"))["fse-dp"].host_bytes_per_device
    assert even[0] == even[1]


def test_one_device_has_nothing_to_forward():
    shape, _ = shape_of("mixtral-8x7b")
    p = predict_layer([[4, 0, 2, 9, 1, 0, 0, 3]], shape, preset("h100"))
    assert p["fse-dp"].d2d_bytes == 0 and p["fse-dp"].host_bytes == p["replicated"].host_bytes
    assert p["fse-dp"].step_s == pytest.approx(p["replicated"].step_s, rel=0.05)


def test_slow_device_links_cost_fse_dp_and_not_replicated():
    shape, spec = shape_of("mixtral-8x7b")
    counts = sample_counts(zipf_popularity(8), 2, 64, 2, seed=3)
    fast = predict_layer(counts, shape, preset("h100"))
    slow = predict_layer(counts, shape, replace(preset("h100"), d2d_bandwidth=2e9))
    assert slow["fse-dp"].step_s > 1.5 * fast["fse-dp"].step_s
    assert slow["replicated"].step_s == fast["replicated"].step_s


def test_needs_a_device_to_device_bandwidth():
    shape, _ = shape_of("mixtral-8x7b")
    with pytest.raises(ValueError, match="d2d_bandwidth"):
        predict_layer([[1] * 8, [1] * 8], shape, replace(preset("h100"), d2d_bandwidth=0.0))
    with pytest.raises(ValueError, match="popularity"):
        sample_counts([1.0, 0.0, 0.0], 2, 4, 2)


def test_plan_cli_devices(capsys):
    rc = main(["plan", "--preset", "mixtral-8x7b", "--hardware", "h100", "--devices", "2", "--prompt-len", "64",
               "--device-batch", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for strategy in ("fse-dp", "expert-parallel", "replicated"):
        assert out.count(f" {strategy} ") == 2, out  # decode and prefill rows
    assert "device-to-device 382.5 GB/s" in out and "not measurements" in out
    assert main(["plan", "--preset", "mixtral-8x7b", "--hardware", "h100", "--devices", "0"]) == 2
