import numpy as np
import pytest

from klotski import _C


def test_page_size_is_power_of_two():
    p = _C.page_size()
    assert p >= 4096 and p & (p - 1) == 0


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 10_000, 1 << 20])
@pytest.mark.parametrize("alignment", [64, 4096, 1 << 16])
def test_aligned_buffer_is_aligned_zeroed_and_writable(nbytes, alignment):
    buf = _C.AlignedHostBuffer(nbytes, alignment)
    assert buf.address % alignment == 0
    assert buf.nbytes == len(buf) == nbytes
    view = np.frombuffer(buf, dtype=np.uint8)
    assert view.shape == (nbytes,) and not view.any()
    view[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
    again = np.frombuffer(buf, dtype=np.uint8)
    assert np.array_equal(again, np.arange(nbytes, dtype=np.uint64).astype(np.uint8))


@pytest.mark.parametrize("alignment", [0, 3, 4097])
def test_bad_alignment_is_a_clear_error(alignment):
    with pytest.raises(ValueError, match="alignment must be a power of two"):
        _C.AlignedHostBuffer(4096, alignment)
