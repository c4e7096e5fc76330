"""An offload directory: validated, owned by Klotski, and locked while it is written.

Rules (one place for each):

* The path is a non-empty string (``""`` would silently mean the current directory).
* Klotski writes only into a directory that is empty or already its own: one holding the lock file
  :data:`LOCK_NAME` (created before the first byte of a store is written) or a finished store's manifest.
  Anything else is refused with the first entries found, so a user's files are never overwritten.
* Writers (a conversion, a replacement) hold an exclusive advisory lock (``flock``) on the lock file;
  users of a finished store hold a shared one for as long as they read it. A writer therefore waits for
  readers and other writers, up to ``timeout`` seconds, then raises :class:`DirectoryBusyError` naming
  the directory. Readers of a finished store need no write access: on a read-only directory they read
  without a lock (no writer can be there either).
* Temporary files are unique per process and writer (:func:`atomic_write`); a failed write removes its
  temporary file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from typing import Callable

LOCK_NAME = ".klotski.lock"
TMP_SUFFIX = ".tmp"
DEFAULT_LOCK_TIMEOUT = 3600.0  # a writer waits this long for another process's conversion of a large model
POLL_S = 0.05


class DirectoryBusyError(RuntimeError):
    """Another process holds the offload directory's lock for longer than the caller waits."""


def check_path(path) -> str:
    """``path`` as an absolute string; a clear ValueError for an empty or non-path value."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"offload_dir must be a path, got {type(path).__name__} {path!r}")
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"offload_dir must be a non-empty path, got {raw!r} (an empty path would mean the "
                         f"current directory)")
    return os.path.abspath(raw)


class OffloadDir:
    """A directory Klotski may write: ``ensure_ours()`` before writing, ``lock(...)`` around use."""

    def __init__(self, path, create: bool = True):
        self.path = check_path(path)
        if create and not os.path.isdir(self.path):
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise ValueError(f"offload_dir {self.path!r} cannot be created: {e.strerror}") from None
        if not os.path.isdir(self.path):
            raise ValueError(f"offload_dir {self.path!r} is not a directory" if os.path.exists(self.path)
                             else f"offload_dir {self.path!r} does not exist")
        self._fd: int | None = None
        self.mode: str | None = None  # "shared" | "exclusive" | None

    # ---- ownership ------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> str:
        return os.path.join(self.path, LOCK_NAME)

    @property
    def writable(self) -> bool:
        return os.access(self.path, os.W_OK | os.X_OK)

    def foreign_entries(self) -> list[str]:
        """Entries that make this directory not Klotski's: [] when it is empty or already ours."""
        from klotski.store.manifest import FORMAT, MANIFEST_NAME

        names = sorted(os.listdir(self.path))
        if not names or LOCK_NAME in names:
            return []
        names = [n for n in names if not _klotski_file(n)]  # e.g. a table an older Klotski left without a lock
        if not names:
            return []
        if MANIFEST_NAME in names:
            try:
                with open(os.path.join(self.path, MANIFEST_NAME)) as f:
                    if json.load(f).get("format") == FORMAT:
                        return []
            except (OSError, ValueError, AttributeError):
                pass
        return names

    def ensure_ours(self, replace: bool = False) -> None:
        """Refuse a non-empty directory that is not Klotski's (unless ``replace``), then mark it ours."""
        foreign = self.foreign_entries()
        if foreign and not replace:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"offload directory {self.path} is not empty and holds no Klotski store (found "
                             f"{shown}); use a new or empty directory (Klotski never writes into other files' "
                             f"directories unless told to replace their contents)")
        self.require_writable("write an expert store or side files into it")
        if not os.path.exists(self.lock_path):
            try:
                os.close(os.open(self.lock_path, os.O_CREAT | os.O_WRONLY, 0o644))
            except OSError as e:
                raise ValueError(f"offload_dir {self.path!r} is not writable: {e.strerror}") from None

    def require_writable(self, why: str) -> None:
        if not self.writable:
            raise ValueError(f"offload_dir {self.path!r} is not writable (needed to {why})")
        probe = None
        try:  # permission bits can lie (read-only mounts, full disks): try a unique probe file
            fd, probe = tempfile.mkstemp(prefix=".klotski-probe.", suffix=TMP_SUFFIX, dir=self.path)
            os.close(fd)
        except OSError as e:
            raise ValueError(f"offload_dir {self.path!r} is not writable (needed to {why}): {e.strerror}") from None
        finally:
            if probe is not None:
                _unlink(probe)

    # ---- locking --------------------------------------------------------------------------------------
    def lock(self, exclusive: bool, timeout: float = DEFAULT_LOCK_TIMEOUT, waiting: Callable[[], None] | None = None) -> bool:
        """Take (or change to) a shared or exclusive lock; False when a shared lock is impossible because the
        directory is read-only and has no lock file (then no writer can be there)."""
        if self._fd is None:
            flags = os.O_RDWR | os.O_CREAT if exclusive or self.writable else os.O_RDONLY
            try:
                self._fd = os.open(self.lock_path, flags, 0o644)
            except OSError as e:
                if not exclusive and e.errno in (errno.ENOENT, errno.EROFS, errno.EACCES):
                    return False
                raise ValueError(f"offload_dir {self.path!r}: cannot open the lock file {LOCK_NAME}: "
                                 f"{e.strerror}") from None
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(self._fd, op | fcntl.LOCK_NB)
                self.mode = "exclusive" if exclusive else "shared"
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    what = "write" if exclusive else "read"
                    raise DirectoryBusyError(
                        f"offload directory {self.path} is in use by another process (waited {timeout:.0f} s to "
                        f"{what} it; lock file {self.lock_path}): another process is converting into it or "
                        f"reading a store there") from None
                if waiting is not None and not told:
                    waiting()
                    told = True
                time.sleep(POLL_S)

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            self.mode = None

    close = unlock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unlock()

    def __del__(self):  # a dropped holder releases its lock (the descriptor would otherwise live on)
        try:
            self.unlock()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- files ----------------------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Temporary files of interrupted writers (call with the exclusive lock held)."""
        return sorted(n for n in os.listdir(self.path) if n.endswith(TMP_SUFFIX))


def _klotski_file(name: str) -> bool:
    """A file only Klotski writes (its names are its own): a prefetch table, a store's layer file or probe."""
    import fnmatch

    from klotski.prefetch import TABLE_GLOB

    return any(fnmatch.fnmatch(name, p) for p in (TABLE_GLOB, "experts-layer[0-9][0-9][0-9].bin", ".klotski-probe.*"))


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary file unique to this call in the same directory: ``write(f)``,
    fsync, rename over ``path``. On any failure (a full disk, an interrupt) the temporary file is removed
    and ``path`` is left as it was."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["DEFAULT_LOCK_TIMEOUT", "DirectoryBusyError", "LOCK_NAME", "OffloadDir", "atomic_write", "check_path",
           "fsync_dir"]
