import pytest


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    """The runtime plans from this machine's measured profile, measured once per session into a temp cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()
