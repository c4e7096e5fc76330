"""The reader tests' files of random bytes (helpers in io_files)."""
import pytest

from io_files import write_random_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Four files: multi-MiB with an odd tail, exactly 1 MiB, odd-sized, one page."""
    return write_random_files(tmp_path_factory.mktemp("reads"), [3 * 1024 * 1024 + 17, 1 << 20, 123_457, 4096],
                              seed=0, prefix="f")
