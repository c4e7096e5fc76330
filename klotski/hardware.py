"""Hardware profile: the rates the cost model needs, measured on this machine or taken from a named preset.

A :class:`HardwareProfile` holds host-to-device / device-to-host / disk-read bandwidth, matmul rate per dtype,
attention rate, memory bandwidth and GPU / CPU memory, for the device and for the CPU (which may compute
too). :func:`measure_profile` measures this machine (GPU when present, else CPU mode: the "device" is the
CPU, "H2D" a memcpy); :func:`load_profile` / :meth:`HardwareProfile.save` cache it as JSON under
``$XDG_CACHE_HOME/klotski/hardware-<device>.json`` (or ``~/.cache/klotski/``; :mod:`klotski.profile_cache`
says when a measurement is cached and how runs correct it). :data:`PRESETS` are published / typical figures for
common machines, labelled ``source="preset"``: estimates, not measurements.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from klotski.units import format_bytes, parse_bytes

GiB = 1 << 30


@dataclass(frozen=True)
class HardwareProfile:
    """Rates in bytes/s and FLOP/s; memory sizes in bytes; overheads in seconds."""

    name: str
    source: str  # "preset" | "measured" (| "...+calibrated")
    device: str  # "cuda" | "cpu" (CPU mode: the device is a bounded RAM pool)
    device_name: str
    gpu_memory: int
    cpu_memory: int
    h2d_bandwidth: float  # pinned host -> device
    d2h_bandwidth: float
    disk_bandwidth: float  # disk -> host memory
    device_mem_bandwidth: float
    matmul_flops: dict = field(default_factory=dict)  # dtype -> FLOP/s on the device
    attention_flops: float = 0.0  # FLOP/s of attention scores / PV on the device
    cpu_matmul_flops: dict = field(default_factory=dict)
    cpu_attention_flops: float = 0.0
    cpu_mem_bandwidth: float = 50e9
    op_overhead_s: float = 10e-6  # per kernel launch on the device
    cpu_op_overhead_s: float = 20e-6
    kind_costs: dict = field(default_factory=dict)  # op kind -> [seconds per call, seconds per token] on the
    # device beyond the roofline, where a calibration run measured that kind apart (klotski.calibration.
    # fit_kind_costs); other kinds, and every preset, pay op_overhead_s per call and nothing per token
    cpu_kind_costs: dict = field(default_factory=dict)
    contention: float = 0.0  # CPU mode: an op's fixed costs (per call, per token) grow by this share while
    # another lane runs on the same cores (klotski.calibration.fit_kind_costs fits it; 0 elsewhere)
    transfer_latency_s: float = 10e-6
    d2d_bandwidth: float = 0.0  # device -> device, one direction, between two GPUs of one machine (0: unknown)
    notes: str = ""

    def matmul_rate(self, dtype: str, device: str = "gpu") -> float:
        """FLOP/s of a matmul in ``dtype`` on ``device`` ("gpu" = the profile's device, "cpu")."""
        table = self.cpu_matmul_flops if device == "cpu" else self.matmul_flops
        if not table:
            raise ValueError(f"hardware profile {self.name!r} has no matmul rates for {device}")
        for key in (dtype, "float8_e4m3" if dtype.startswith("float8") else dtype, "bfloat16", "float16"):
            if key in table:
                return table[key]
        return min(table.values())

    def with_memory(self, gpu_memory=None, cpu_memory=None) -> "HardwareProfile":
        """A copy with other memory limits (ints or strings like "24GiB")."""
        return replace(
            self,
            gpu_memory=self.gpu_memory if gpu_memory is None else parse_bytes(gpu_memory),
            cpu_memory=self.cpu_memory if cpu_memory is None else parse_bytes(cpu_memory),
        )

    @property
    def calibrated(self) -> bool:
        """Whether a run's per-op timings have been fitted into this profile (its source says "+calibrated")."""
        return self.source.endswith("+calibrated")

    def summary(self) -> str:
        mm = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in self.matmul_flops.items())
        return (f"{self.name} [{self.source}] {self.device_name}: GPU {format_bytes(self.gpu_memory)}, "
                f"CPU {format_bytes(self.cpu_memory)}, H2D {self.h2d_bandwidth / 1e9:.1f} GB/s, "
                f"disk {self.disk_bandwidth / 1e9:.1f} GB/s, matmul {mm}")

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"hardware profile: unknown fields {sorted(unknown)}")
        d = dict(d)
        for key in ("gpu_memory", "cpu_memory"):
            if key in d:
                d[key] = parse_bytes(d[key])
        return cls(**d)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the profile as JSON (default: this machine's cache for its device)."""
        path = Path(path) if path is not None else default_profile_path(self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _preset(name, device_name, gpu_gib, h2d, mem_bw, matmul, attn, notes, disk=3.0e9, cpu_gib=256):
    return HardwareProfile(
        name=name, source="preset", device="cuda", device_name=device_name,
        gpu_memory=gpu_gib * GiB, cpu_memory=cpu_gib * GiB, h2d_bandwidth=h2d, d2h_bandwidth=h2d,
        disk_bandwidth=disk, device_mem_bandwidth=mem_bw, matmul_flops=matmul, attention_flops=attn,
        cpu_matmul_flops={"float32": 1.0e12, "bfloat16": 0.8e12}, cpu_attention_flops=0.5e12,
        cpu_mem_bandwidth=80e9, notes=notes,
    )


# Achievable (not peak) figures: ~70% of the datasheet dense tensor rate, ~85% of the link rate.
PRESETS: dict[str, HardwareProfile] = {p.name: p for p in [
    _preset("rtx3090-pcie4", "NVIDIA GeForce RTX 3090 24GB, PCIe 4.0 x16", 24, 24e9, 800e9,
            {"bfloat16": 28e12, "float16": 28e12, "float32": 25e12, "float8_e4m3": 28e12}, 20e12,
            "paper machine 1 (Klotski, ASPLOS'25); GeForce GA102: 35.6 TFLOP/s dense bf16/fp16 with fp32 "
            "accumulate (71 with fp16 accumulate), 936 GB/s"),
    _preset("h800-pcie5", "NVIDIA H800 PCIe 80GB, PCIe 5.0 x16", 80, 48e9, 1700e9,
            {"bfloat16": 500e12, "float16": 500e12, "float32": 40e12, "float8_e4m3": 900e12}, 250e12,
            "paper machine 2 (Klotski, ASPLOS'25); ~756 TFLOP/s dense bf16 peak, 2.0 TB/s", disk=6.0e9, cpu_gib=512),
    _preset("t4", "NVIDIA T4 16GB, PCIe 3.0 x16", 16, 11e9, 270e9,
            {"float16": 40e12, "bfloat16": 6e12, "float32": 6e12, "float8_e4m3": 40e12}, 20e12,
            "no bf16 tensor cores (bf16 runs at fp32 rate); 65 TFLOP/s fp16 peak, 320 GB/s", cpu_gib=64),
    _preset("l4", "NVIDIA L4 24GB, PCIe 4.0 x16", 24, 24e9, 250e9,
            {"bfloat16": 85e12, "float16": 85e12, "float32": 25e12, "float8_e4m3": 170e12}, 40e12,
            "121 TFLOP/s dense bf16 peak, 300 GB/s", cpu_gib=128),
    _preset("a5000", "NVIDIA RTX A5000 24GB, PCIe 4.0 x16", 24, 24e9, 650e9,
            {"bfloat16": 75e12, "float16": 75e12, "float32": 19e12, "float8_e4m3": 75e12}, 35e12,
            "MoE-Gen's card (arXiv 2503.09716); NVIDIA RTX A5000 datasheet: 27.8 TFLOP/s fp32, 222.2 TFLOP/s "
            "tensor with sparsity (111 dense fp16/bf16), 768 GB/s GDDR6; host memory 256 GiB assumed"),
    _preset("a100-80gb", "NVIDIA A100 80GB SXM, PCIe 4.0 x16", 80, 24e9, 1700e9,
            {"bfloat16": 220e12, "float16": 220e12, "float32": 19e12, "float8_e4m3": 220e12}, 120e12,
            "312 TFLOP/s dense bf16 peak, 2.0 TB/s", disk=5.0e9, cpu_gib=512),
    _preset("h100-80gb", "NVIDIA H100 80GB SXM, PCIe 5.0 x16", 80, 48e9, 2800e9,
            {"bfloat16": 650e12, "float16": 650e12, "float32": 60e12, "float8_e4m3": 1200e12}, 300e12,
            "989 TFLOP/s dense bf16 peak, 3.35 TB/s", disk=6.0e9, cpu_gib=512),
]}
# Device-to-device bandwidth (one direction, GPU to GPU in one machine), ~85% of the link rate as above:
# NVLink 4 on H100 SXM 450 GB/s and NVLink 3 on A100 SXM 300 GB/s per direction (NVIDIA H100 / A100 datasheets:
# 900 / 600 GB/s bidirectional); the PCIe cards peer to peer over their PCIe link, one direction of x16: 4.0
# 32 GB/s (RTX 3090 without an NVLink bridge, L4, RTX A5000 without its bridge), 5.0 64 GB/s (H800 PCIe), 3.0
# 16 GB/s (T4).
_D2D_LINK = {"rtx3090-pcie4": 32e9, "h800-pcie5": 64e9, "t4": 16e9, "l4": 32e9, "a5000": 32e9, "a100-80gb": 300e9,
             "h100-80gb": 450e9}
PRESETS = {name: replace(p, d2d_bandwidth=0.85 * _D2D_LINK[name]) for name, p in PRESETS.items()}
PRESET_ALIASES = {"rtx3090": "rtx3090-pcie4", "3090": "rtx3090-pcie4", "h800": "h800-pcie5", "rtx-a5000": "a5000",
                  "a100": "a100-80gb", "h100": "h100-80gb"}


def preset(name: str) -> HardwareProfile:
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise KeyError(f"unknown hardware preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def default_profile_path(device: str | None = None) -> Path:
    """Where this machine's profile of ``device`` ("cuda" | "cpu") is cached:
    ``$XDG_CACHE_HOME/klotski/hardware-<device>.json`` (or ``~/.cache/klotski/``). Without a device: the
    GPU's profile when one is cached, else the CPU's (see :mod:`klotski.profile_cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "klotski"
    if device is None:
        device = "cuda" if (root / "hardware-cuda.json").is_file() else "cpu"
    return root / f"hardware-{device}.json"


def load_profile(path: str | os.PathLike | None = None) -> HardwareProfile:
    path = Path(path) if path is not None else default_profile_path()
    if not path.is_file():
        raise FileNotFoundError(f"no hardware profile at {path} (run `klotski profile` to measure one)")
    try:
        return HardwareProfile.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def get_hardware(name_or_path: str | os.PathLike) -> HardwareProfile:
    """A preset by name, or a profile JSON by path."""
    s = os.fspath(name_or_path)
    if s.endswith(".json") or os.path.sep in s or os.path.isfile(s):
        return load_profile(s)
    return preset(s)


# ---- measurement ---------------------------------------------------------------------------------------

def _best_time(fn, sync, reps: int, budget_s: float) -> float:
    fn()
    sync()
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def _measure_matmul(torch, device, dtype, n, sync, budget_s) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best_time(lambda: torch.mm(a, b), sync, 5, budget_s)
    return 2.0 * n**3 / t


def _measure_attention(torch, device, dtype, sync, budget_s, big: bool) -> float:
    bs, heads, q, d = (8, 16, 512, 128) if big else (2, 8, 256, 64)
    x = torch.randn(bs, heads, q, d, device=device, dtype=dtype)
    f = torch.nn.functional.scaled_dot_product_attention
    t = _best_time(lambda: f(x, x, x, is_causal=True), sync, 5, budget_s)
    return 2.0 * bs * heads * q * (q + 1) / 2 * 2 * d / t


def _measure_call_overhead(torch, device, sync, budget_s) -> float:
    """Seconds per call of the runtime's expert function (``klotski.triton_kernels.fused_moe``: Triton on
    CUDA, the torch reference on CPU) on a one-token, one-expert problem too small to cost FLOPs: the fixed
    cost every compute op of a schedule pays (Python dispatch, kernel launches)."""
    from klotski.triton_kernels import fused_moe

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(1, 64, device=device, dtype=dtype)
    w13 = torch.randn(1, 128, 64, device=device, dtype=dtype)
    w2 = torch.randn(1, 64, 64, device=device, dtype=dtype)
    weights = torch.ones(1, 1, device=device, dtype=torch.float32)
    ids = torch.zeros(1, 1, device=device, dtype=torch.int32)
    calls = 20

    def run():  # back to back, one sync: launches overlap the device work as they do in a step
        for _ in range(calls):
            fused_moe(x, w13, w2, weights, ids)

    return _best_time(run, sync, 5, budget_s) / calls


def _measure_disk(directory: str | None, nbytes: int) -> float:
    """Cold-cache sequential read rate of a temporary file (page cache dropped with fadvise)."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix="klotski-disk-", delete=False) as f:
        path = f.name
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            t0, total = time.perf_counter(), 0
            while True:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                total += n
            return total / max(time.perf_counter() - t0, 1e-9)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


def _busy_note() -> str:
    """A warning (and a note for the profile) when other work is running: rates measured then are too low, and
    the profile is cached, so every later plan would inherit them."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # pragma: no cover - no load average on this platform
        return ""
    if load <= 1.0 + 0.5 * cores:  # this process counts one; half the cores busy with other work is too much
        return ""
    import warnings

    msg = (f"measuring this machine while it is busy (load average {load:.1f} on {cores} cores): the profile's "
           "rates may be too low; re-run `klotski profile` when it is idle, or calibrate on a run "
           "(`klotski bench --calibrate`)")
    warnings.warn(msg, stacklevel=3)
    return f"; measured under load average {load:.1f} on {cores} cores"


def measure_profile(device: str | None = None, disk_dir: str | None = None, quick: bool = True,
                    name: str | None = None) -> HardwareProfile:
    """Measure this machine. ``device``: "cuda" or "cpu" (default: cuda when available).

    CPU mode finishes in a few seconds: device compute = CPU matmul, H2D/D2H = memcpy rate of large
    tensors, device memory = the RAM pool (half of the available memory). Disk: a cold read of a temp file
    in ``disk_dir`` (default: the temp dir).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    busy = _busy_note()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("measure_profile(device='cuda'): no CUDA device is available")
    budget = 1.0 if quick else 4.0
    cpu_sync = lambda: None  # noqa: E731
    cpu_mm = {
        "float32": _measure_matmul(torch, "cpu", torch.float32, 512 if quick else 1024, cpu_sync, budget),
        "bfloat16": _measure_matmul(torch, "cpu", torch.bfloat16, 512 if quick else 1024, cpu_sync, budget),
    }
    cpu_attn = _measure_attention(torch, "cpu", torch.float32, cpu_sync, budget, big=False)
    nbytes = (64 if quick else 256) << 20
    # written first: an untouched source maps every page to the kernel's one zero page, read from cache (it
    # measured 1.4-4x this machine's memory bandwidth)
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    cpu_bw = 2.0 * nbytes / _best_time(lambda: dst.copy_(src), cpu_sync, 5, budget)  # read + write
    disk = _measure_disk(disk_dir, (64 if quick else 512) << 20)
    cpu_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if device == "cpu":
        # "H2D" in CPU mode: host weights (bf16 checkpoints) copied into the fp32 device pool, a converting
        # copy; rate in source bytes/s
        half = torch.empty(nbytes // 2, dtype=torch.bfloat16).fill_(1.0)
        full = torch.empty(nbytes // 2, dtype=torch.float32)
        copy_bw = nbytes / _best_time(lambda: full.copy_(half), cpu_sync, 5, budget)
        overhead = _measure_call_overhead(torch, "cpu", cpu_sync, budget)
        return HardwareProfile(
            name=name or "this-machine-cpu", source="measured", device="cpu",
            device_name=f"CPU ({os.cpu_count()} cores, torch {torch.__version__})",
            gpu_memory=cpu_avail // 2, cpu_memory=cpu_total, h2d_bandwidth=copy_bw, d2h_bandwidth=copy_bw,
            disk_bandwidth=disk, device_mem_bandwidth=cpu_bw, matmul_flops=dict(cpu_mm),
            attention_flops=cpu_attn, cpu_matmul_flops=dict(cpu_mm), cpu_attention_flops=cpu_attn,
            cpu_mem_bandwidth=cpu_bw, op_overhead_s=overhead, cpu_op_overhead_s=overhead, transfer_latency_s=5e-6,
            notes="CPU mode: device = bounded RAM pool (half the available memory), H2D = bf16 -> fp32 copy, "
                  "op overhead = one tiny expert call" + busy,
        )
    sync = torch.cuda.synchronize
    n = 2048 if quick else 8192
    gpu_mm = {name_: _measure_matmul(torch, "cuda", dt, n, sync, budget) for name_, dt in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
    gpu_attn = _measure_attention(torch, "cuda", torch.bfloat16, sync, budget, big=True)
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = nbytes / _best_time(lambda: dev.copy_(host, non_blocking=True), sync, 5, budget)
    d2h = nbytes / _best_time(lambda: host.copy_(dev, non_blocking=True), sync, 5, budget)
    dev2 = torch.empty_like(dev)
    dev_bw = 2.0 * nbytes / _best_time(lambda: dev2.copy_(dev), sync, 5, budget)
    free, total = torch.cuda.mem_get_info()
    return HardwareProfile(
        name=name or "this-machine", source="measured", device="cuda",
        device_name=torch.cuda.get_device_name(), gpu_memory=int(total), cpu_memory=cpu_total,
        h2d_bandwidth=h2d, d2h_bandwidth=d2h, disk_bandwidth=disk, device_mem_bandwidth=dev_bw,
        matmul_flops=gpu_mm, attention_flops=gpu_attn, cpu_matmul_flops=cpu_mm, cpu_attention_flops=cpu_attn,
        cpu_mem_bandwidth=cpu_bw, op_overhead_s=_measure_call_overhead(torch, "cuda", sync, budget),
        notes=f"measured with torch {torch.__version__}; free GPU memory {free} B; op overhead = one tiny "
              f"expert call" + busy,
    )
