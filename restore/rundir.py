"""A restore's private run directory (qemu-nbd sockets and logs), and the removal of those killed runs left.

A restore killed with SIGKILL cannot clean up: its qemu-nbd dies with it (``PR_SET_PDEATHSIG``, see
:class:`.targets.QemuNbdTarget`), but its run directory stays in ``$TMPDIR``. The directory carries the
run's pid in its name (``fleece-restore-<pid>-…``), so the next restore can tell a dead run's directory
from a live one's and remove it.

``$TMPDIR`` is shared with everyone, so nothing here trusts a name or follows a symlink: each entry is
opened through a descriptor of the parent with ``O_NOFOLLOW | O_DIRECTORY`` and judged by ``fstat`` of
what was opened. A symlink, a file, another user's directory, a pid that lives (or is no pid at all) is
left alone, and nothing that goes wrong here stops the restore: this is housekeeping. (The same rules as
the backup's ``exporter.graph.remove_leftovers``, which restore must not import.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "fleece-restore-"
RUN_DIR = re.compile(rf"^{PREFIX}(\d+)-")


def make_run_dir() -> Path:
    """A new ``0700`` run directory in the temporary directory, after removing killed runs' ones."""
    parent = Path(tempfile.gettempdir())
    remove_leftovers(parent)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))


def remove_leftovers(parent: Path) -> None:
    """Remove the run directories of killed restores in *parent*: real directories we own, pid gone."""
    try:
        top = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # mkdtemp says what is wrong with the temporary directory
    try:
        for name in os.listdir(top):
            m = RUN_DIR.match(name)
            if not m or _may_be_alive(int(m.group(1))):
                continue
            try:
                if _remove_own_dir(top, name):
                    log.info("removed %s, left by a killed restore", parent / name)
            except OSError as exc:
                log.warning("cannot remove %s, left by a killed restore: %s", parent / name, exc.strerror or exc)
    except OSError as exc:
        log.debug("cannot list %s for leftovers of killed restores: %s", parent, exc)
    finally:
        os.close(top)


def _may_be_alive(pid: int) -> bool:
    """Whether *pid* may be a running process; in doubt yes (its directory then stays)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, another user's; a number too big for a pid: not ours
        return True
    return True


def _remove_own_dir(parent: int, name: str) -> bool:
    """Remove directory *name* of the directory open as *parent* if it is one, and ours; else ``False``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return False  # a symlink (ELOOP), not a directory (ENOTDIR), gone or unreadable: not ours to touch
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return False
        for child in os.listdir(fd):  # a run directory is flat: sockets and logs
            if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(child, dir_fd=fd)  # descriptor-based, never follows a symlink
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    if not os.path.samestat(st, os.stat(name, dir_fd=parent, follow_symlinks=False)):
        return False  # swapped under us (only possible in a directory without the sticky bit)
    os.rmdir(name, dir_fd=parent)
    return True
