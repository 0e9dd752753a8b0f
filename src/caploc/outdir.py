"""Where a result is written: the output location checked before any work, and one writer per directory."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import CaplocError


def check_out_dir(path: Path | str, what: str = "--out") -> Path:
    """Refuse an output location that cannot hold a result directory, before any computation starts."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CaplocError(f"{what} {path} is a file; pass a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CaplocError(f"{what} {path} is inside {probe}, which is a file; pass another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CaplocError(f"{what} {path} is not writable ({probe} does not allow it); pass another directory")
    return path


class OutLock:
    """An exclusive, non-blocking lock on a result directory (``DIR/.caploc.lock``), held while a verb writes there.

    A second process writing into the same directory gets a one-line error instead of mixing shards and metadata.
    The lock is an OS file lock, so it disappears with the process even after SIGKILL. On a clean exit the lock file is
    removed (while still locked; a process that opened the old file notices the unlinked inode and retries), and a
    directory the lock itself created is removed again if nothing was written into it, so a refused command leaves no
    trace. Re-entrant within one process (nested stages share the outer lock)."""

    _held: dict[str, int] = {}

    def __init__(self, out_dir: Path | str):
        self.path = Path(out_dir).expanduser().resolve() / ".caploc.lock"
        self._fd: int | None = None
        self._made_dir = False

    def __enter__(self) -> "OutLock":
        import fcntl

        k = str(self.path)
        if k in OutLock._held:
            OutLock._held[k] += 1
            return self
        self._made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise CaplocError(f"another caploc process is writing into {self.path.parent}; wait for it or pass "
                                  "another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
        else:  # pragma: no cover - needs 100 lost races in a row
            raise CaplocError(f"could not lock {self.path.parent}; retry")
        self._fd = fd
        OutLock._held[k] = 1
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        k = str(self.path)
        OutLock._held[k] -= 1
        if OutLock._held[k] == 0:
            del OutLock._held[k]
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            if self._made_dir:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only if empty: nothing was written


__all__ = ["check_out_dir", "OutLock"]
