"""One backup per VM at a time: an advisory ``flock`` on a per-VM lock file.

The kernel drops the lock when the holder dies, so a killed run never blocks the next one, and a run
that finds the lock free but ``fleece-`` leftovers in QEMU knows they belong to a dead run it may unwind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from fleece.repository.errors import BackupBusyError


_HELD: set[int] = set()  # descriptors of the locks this process holds (a thaw guard inherits them)


def held_fds() -> list[int]:
    """The descriptors of every VM lock this process holds now. A child given them keeps the VMs locked
    while it lives (flock belongs to the open file, not the process): the thaw guard, so that no new run
    freezes or pauses a guest the guard may still thaw or resume (exporter/agent.py)."""
    return sorted(_HELD)


def lock_dir() -> Path:
    for candidate in (Path("/run/lock/fleece"), Path(os.environ.get("XDG_RUNTIME_DIR", "")) / "fleece",
                      Path(tempfile.gettempdir()) / f"fleece-locks-{os.getuid()}"):
        if not str(candidate).startswith("/fleece"):
            try:
                candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
                if os.access(candidate, os.W_OK):
                    return candidate
            except OSError:
                continue
    raise BackupBusyError("no writable directory for fleece's lock files (/run/lock, $XDG_RUNTIME_DIR, /tmp)")


class VmLock:
    """Exclusive lock named by *key* (the QMP socket's real path, or the VM name)."""

    def __init__(self, key: str, what: str) -> None:
        self.path = lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BackupBusyError(f"another fleece backup (pid {holder}) is already running on {self.what}; "
                                      f"wait for it to finish (lock file {self.path})") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
