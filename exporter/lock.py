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
import time
from pathlib import Path

from fleece.repository.errors import BackupBusyError


_HELD: dict[int, Path] = {}  # descriptor → lock file, of the locks this process holds (its guards inherit them)


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


#: seconds a run waits for a lock whose recorded holder cannot be holding it (dead, or this very process):
#: a run's pause guard (exporter/pause.py) inherits the lock; it keeps it while it resumes the guest of a
#: run killed inside its pause (~0.1 s), or until its start-up ends after a run that failed before its
#: pause. A thaw guard that must keep trying writes its own pid, and a run finding it alive is told at once.
DEAD_HOLDER_GRACE = 10.0


def _not_the_holder(holder: str, path: Path) -> bool:
    """Whether the pid a lock file names is gone, or is this process and it does not hold *path* itself."""
    if not holder.isdigit():
        return False
    if int(holder) == os.getpid():
        return path not in _HELD.values()
    try:  # a zombie is dead too (its parent has not reaped it yet)
        return Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False


class VmLock:
    """Exclusive lock named by *key* (the QMP socket's real path, or the VM name)."""

    def __init__(self, key: str, what: str) -> None:
        self.path = lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + DEAD_HOLDER_GRACE
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if not _not_the_holder(holder, self.path):
                    raise BackupBusyError(f"another fleece backup (pid {holder}) is already running on "
                                          f"{self.what}; wait for it to finish (lock file {self.path})")
                if time.monotonic() >= deadline:
                    raise BackupBusyError(f"{self.what} is still locked {DEAD_HOLDER_GRACE:.0f} s after the run that "
                                          f"took the lock (pid {holder}) ended: a process it started holds it "
                                          f"(fuser -v {self.path} names it); wait for it or end it")
                # the run that wrote its pid is gone, or is this process, which no longer holds it: a
                # guard that inherited the lock (exporter/agent.py) is finishing
                time.sleep(0.02)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD[fd] = self.path

    def release(self) -> None:
        if self._fd is not None:
            _HELD.pop(self._fd, None)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
