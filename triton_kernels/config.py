"""Kernel launch configs (block sizes, warps, stages) as JSON per (E, N, device), looked up by nearest M.

A config file ``configs/E={E},N={N},device_name={device}.json`` maps a token count M (a JSON key) to a config::

    {"1":  {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
     "64": {...}, ...}

N is the intermediate size I (``w2.shape[-1]``); the device name is ``torch.cuda.get_device_name()`` with spaces
replaced by underscores, or ``interpreter`` under ``TRITON_INTERPRET=1``. Lookup order: the (E, N, device) file,
then a per-device file ``device_name={device}.json`` valid for any shape, then :func:`default_config`.
``bench/kernels/tune_fused_moe.py`` writes the per-(E, N, device) files.

int4 experts (w4a16) have tables of their own: the same names with ``,dtype=int4_w4a16`` before ``.json``
(``E=..,N=..,device_name=..,dtype=int4_w4a16.json``, then ``device_name=..,dtype=int4_w4a16.json``), then
:func:`default_config`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
INTERPRETER_DEVICE = "interpreter"
INT4_DTYPE = "int4_w4a16"  # weight dtype key of int4 expert configs


def _suffix(weight_dtype: str | None) -> str:
    return f",dtype={weight_dtype}" if weight_dtype else ""


def config_file_name(num_experts: int, intermediate_size: int, device_name: str,
                     weight_dtype: str | None = None) -> str:
    return f"E={num_experts},N={intermediate_size},device_name={device_name}{_suffix(weight_dtype)}.json"


def device_file_name(device_name: str, weight_dtype: str | None = None) -> str:
    return f"device_name={device_name}{_suffix(weight_dtype)}.json"


def device_name_of(device: torch.device, interpret: bool) -> str:
    """Config key for the device the kernels run on."""
    if interpret:
        return INTERPRETER_DEVICE
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def check_config(config: dict, where: str = "config") -> dict:
    """Validate one config dict (all keys present, positive ints, block sizes powers of two)."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{where} is missing keys {missing}; expected {list(CONFIG_KEYS)}")
    for key in CONFIG_KEYS:
        value = config[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
        if config[key] & (config[key] - 1):
            raise ValueError(f"{where}: {key} must be a power of two, got {config[key]}")
    if config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16 or config["BLOCK_K"] < 16:
        raise ValueError(f"{where}: block sizes must be >= 16 (tl.dot), got {config}")
    return {k: config[k] for k in CONFIG_KEYS}


def default_config(
    num_tokens: int, num_experts: int, top_k: int, interpret: bool = False, dtype_bytes: int = 2
) -> dict:
    """Config for shapes and devices without a tuned file.

    The block height follows the expected pairs per expert (M*k/E): small groups waste less of a short block.
    Tiles stay within ~100 KB of shared memory (gemm1 holds an x tile and two weight tiles per stage), so they
    fit consumer GPUs too; fp32 gets fewer stages.
    """
    pairs_per_expert = num_tokens * top_k / max(num_experts, 1)
    if interpret:  # few, large programs: the interpreter's cost is per program and per loop step
        block_m = 16 if pairs_per_expert <= 16 else 32
        return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    stages = 4 if dtype_bytes <= 2 else 2
    if pairs_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=stages)
    if pairs_per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=stages)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=stages)


def nearest_entry(table: dict[int, dict], num_tokens: int) -> dict:
    """The config whose M key is nearest to ``num_tokens`` (ties: the smaller key)."""
    key = min(table, key=lambda m: (abs(m - num_tokens), m))
    return table[key]


class KernelConfigs:
    """Config tables read from a directory of JSON files, cached per file."""

    def __init__(self, directory: str | Path = CONFIG_DIR):
        self.directory = Path(directory)
        self._tables: dict[str, dict[int, dict] | None] = {}

    def table(self, file_name: str) -> dict[int, dict] | None:
        """The M -> config table in ``file_name``, or None when there is no such file."""
        if file_name not in self._tables:
            self._tables[file_name] = self._read(self.directory / file_name)
        return self._tables[file_name]

    @staticmethod
    def _read(path: Path) -> dict[int, dict] | None:
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"kernel config file {path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"kernel config file {path} must be a non-empty object of M -> config")
        table = {}
        for key, cfg in raw.items():
            try:
                m = int(key)
            except ValueError as err:
                raise ValueError(f"kernel config file {path}: key {key!r} is not a token count") from err
            table[m] = check_config(cfg, where=f"{path} [M={key}]")
        return table

    def lookup(
        self, num_tokens: int, num_experts: int, intermediate_size: int, top_k: int, device_name: str,
        dtype_bytes: int = 2, weight_dtype: str | None = None,
    ) -> dict:
        """Config for M = ``num_tokens`` on the (E, N, device) problem; see the module docstring for the order.

        Tuned GPU files are for 16-bit activations; 4-byte (fp32) ones on a GPU take :func:`default_config`, whose
        tiles are sized for them. ``weight_dtype`` (:data:`INT4_DTYPE` for int4 experts) selects that dtype's
        tables; ``dtype_bytes`` is the activations' element size.
        """
        interpret = device_name == INTERPRETER_DEVICE
        if interpret or dtype_bytes <= 2:
            for name in (config_file_name(num_experts, intermediate_size, device_name, weight_dtype),
                         device_file_name(device_name, weight_dtype)):
                table = self.table(name)
                if table is not None:
                    return dict(nearest_entry(table, num_tokens))
        return default_config(num_tokens, num_experts, top_k, interpret=interpret, dtype_bytes=dtype_bytes)


@functools.lru_cache(maxsize=None)
def packaged_configs() -> KernelConfigs:
    """The configs shipped in ``klotski.triton_kernels/configs``."""
    return KernelConfigs(CONFIG_DIR)
