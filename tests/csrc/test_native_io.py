"""The native module's contract as seen from Python: error types, import without CUDA."""
import os
import subprocess
import sys

from klotski import _C


def test_error_types_map_to_python_builtins():
    assert issubclass(_C.ShortReadError, OSError)
    assert issubclass(_C.RingExhaustedError, TimeoutError)
    assert issubclass(_C.SlotStateError, RuntimeError)
    assert issubclass(_C.ReaderClosedError, RuntimeError)
    assert issubclass(_C.CudaError, RuntimeError)


def test_span_bytes():
    assert _C.span_bytes(0, 4096) == 4096
    assert _C.span_bytes(1, 4096) == 8192
    assert _C.span_bytes(4095, 2) == 8192
    assert _C.span_bytes(8192, 0) == 0


def test_imports_and_reads_with_cuda_disabled(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 64)
    code = (
        "from klotski import _C\n"
        "info = _C.cuda_info(); assert not info['available'] and 'KLOTSKI_DISABLE_CUDA' in info['reason'], info\n"
        "ring = _C.PinnedRing(2, 8192); assert ring.pinned in ('mlock', 'none'), ring.pinned\n"
        "s = ring.acquire(1.0); r = _C.DiskReader('AUTO', 2, 4096)\n"
        f"r.read_into_slot({str(path)!r}, 100, 1000, s).wait(5.0)\n"
        f"assert bytes(memoryview(s)[100:1100]) == open({str(path)!r}, 'rb').read()[100:1100]\n"
        "print('ok')\n"
    )
    env = dict(os.environ, KLOTSKI_DISABLE_CUDA="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
