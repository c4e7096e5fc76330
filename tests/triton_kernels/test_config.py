"""Kernel config files: naming, nearest-M lookup, fallback order, validation."""
import json

import pytest

from klotski.triton_kernels.config import (
    CONFIG_KEYS,
    KernelConfigs,
    config_file_name,
    default_config,
    device_file_name,
    packaged_configs,
)


def cfg(block_m, **kw):
    base = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    base.update(kw)
    return base


def write(directory, name, table):
    (directory / name).write_text(json.dumps({str(m): c for m, c in table.items()}))


def test_file_names():
    assert config_file_name(8, 14336, "NVIDIA_H100_80GB_HBM3") == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json"
    assert device_file_name("interpreter") == "device_name=interpreter.json"


def test_nearest_m(tmp_path):
    write(tmp_path, config_file_name(8, 200, "devA"), {1: cfg(16), 64: cfg(32), 1024: cfg(128)})
    configs = KernelConfigs(tmp_path)
    pick = lambda m: configs.lookup(m, 8, 200, 2, "devA")["BLOCK_M"]  # noqa: E731
    assert [pick(m) for m in (1, 2, 32, 33, 100, 544, 545, 8192)] == [16, 16, 16, 32, 32, 32, 128, 128]


def test_fallback_order(tmp_path):
    write(tmp_path, config_file_name(8, 200, "devA"), {1: cfg(16)})
    write(tmp_path, device_file_name("devA"), {1: cfg(64)})
    configs = KernelConfigs(tmp_path)
    assert configs.lookup(5, 8, 200, 2, "devA")["BLOCK_M"] == 16  # exact (E, N, device) file
    assert configs.lookup(5, 4, 200, 2, "devA")["BLOCK_M"] == 64  # per-device file
    assert configs.lookup(5, 4, 200, 2, "devB") == default_config(5, 4, 2)  # unknown device
    assert configs.lookup(5, 8, 200, 2, "devA", dtype_bytes=4) == default_config(5, 8, 2, dtype_bytes=4)
    assert default_config(5, 8, 2, dtype_bytes=4)["num_stages"] < default_config(5, 8, 2)["num_stages"]


def test_default_config_follows_pairs_per_expert():
    assert default_config(1, 8, 2)["BLOCK_M"] == 16
    assert default_config(8192, 8, 2)["BLOCK_M"] == 64
    assert default_config(64, 128, 8)["BLOCK_M"] == 16  # 4 pairs per expert
    for m in (1, 100, 10000):
        assert set(default_config(m, 8, 2)) == set(CONFIG_KEYS)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("{}", "non-empty object"),
        (json.dumps({"x": cfg(16)}), "not a token count"),
        (json.dumps({"1": {"BLOCK_M": 16}}), "missing keys"),
        (json.dumps({"1": cfg(24)}), "power of two"),
        (json.dumps({"1": cfg(16, num_stages=0)}), "positive int"),
    ],
)
def test_bad_files_raise(tmp_path, content, message):
    (tmp_path / config_file_name(8, 200, "devA")).write_text(content)
    with pytest.raises(ValueError, match=message):
        KernelConfigs(tmp_path).lookup(1, 8, 200, 2, "devA")


def test_packaged_files_are_valid():
    configs = packaged_configs()
    names = sorted(p.name for p in configs.directory.glob("*.json"))
    assert device_file_name("interpreter") in names
    for name in names:
        assert configs.table(name)  # parses and validates every entry
