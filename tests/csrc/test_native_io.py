"""The native module's contract as seen from Python: error types, import without CUDA or io_uring."""
import errno
import os
import platform
import subprocess
import sys

import pytest

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


# Installs a seccomp filter that makes io_uring_setup (syscall 425 on x86_64 and aarch64) fail with ERRNO,
# as container runtimes do, before klotski is imported.
SECCOMP_REFUSE_IO_URING = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
def insn(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
prog = (insn(0x20, 0)                      # A = seccomp_data.nr
        + insn(0x15, 425, 0, 1)            # if A == __NR_io_uring_setup
        + insn(0x06, 0x00050000 | ERRNO)   #   return SECCOMP_RET_ERRNO | ERRNO
        + insn(0x06, 0x7FFF0000))          # return SECCOMP_RET_ALLOW
code = ctypes.create_string_buffer(prog, len(prog))
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = SockFprog(len(prog) // 8, ctypes.addressof(code))
assert libc.prctl(38, 1, 0, 0, 0) == 0                                  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64") or not sys.platform.startswith("linux"),
                    reason="the filter names io_uring_setup by its x86_64/aarch64 syscall number")
@pytest.mark.parametrize("errno_name", ["ENOSYS", "EPERM"])
def test_io_uring_refused_by_seccomp_falls_back_to_threads(tmp_path, errno_name):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 64)
    code = SECCOMP_REFUSE_IO_URING.replace("ERRNO", str(getattr(errno, errno_name))) + (
        "from klotski import _C\n"
        "from klotski.io import DiskReader, io_uring_info\n"
        "info = io_uring_info(); assert not info['available'] and 'io_uring_setup failed' in info['reason'], info\n"
        "r = DiskReader(mode='AUTO', num_threads=2)\n"
        "assert r.engine == 'threads', r.engine\n"
        "assert 'io_uring unavailable: io_uring_setup failed' in r.engine_note, r.engine_note\n"
        f"assert r.read_bytes({str(path)!r}, 100, 1000, timeout=5) == open({str(path)!r}, 'rb').read()[100:1100]\n"
        "r.close()\n"
        "try:\n"
        "    DiskReader(engine='uring')\n"
        "except RuntimeError as e:\n"
        "    assert 'io_uring unavailable: io_uring_setup failed' in str(e), e\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:") and os.strerror(getattr(errno, errno_name)) in out.stdout, out.stdout


def test_read_now_returns_a_finished_ticket_and_raises_at_the_call(tmp_path):
    path = tmp_path / "n.bin"
    path.write_bytes(bytes(range(256)) * 64)
    reader = _C.DiskReader("AUTO", 1, 4096)
    ring = _C.PinnedRing(1, 16384)
    slot = ring.acquire(1.0)
    t = reader.read_now_into_slot(str(path), 5000, 9000, slot)  # 3 chunks' worth, one pread loop
    assert t.done() and (t.view_offset, t.mode) == (5000 % 4096, "DIRECT")
    t.wait(0.0)
    assert bytes(memoryview(slot)[t.view_offset:t.view_offset + 9000]) == path.read_bytes()[5000:14000]
    buf = _C.AlignedHostBuffer(16384)
    with pytest.raises(_C.ShortReadError, match="at offset 16000, 1000 bytes"):
        reader.read_now(str(path), 16000, 1000, buf.address, len(buf))  # the error comes from the call itself
    slot.release()
    reader.close(False)
    with pytest.raises(_C.ReaderClosedError, match="reader is closed"):
        reader.read_now(str(path), 0, 10, buf.address, len(buf))
