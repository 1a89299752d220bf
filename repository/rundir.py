"""Private run directories in shared places, and the removal of those killed runs left behind.

A backup keeps its NBD socket and fleece targets in one (under ``--scratch``, ``/var/tmp`` by default),
a restore its qemu-nbd sockets and logs (in ``$TMPDIR``). ``mkdtemp`` makes each 0700 from the moment
it exists, under a name nobody can predict or plant. A run killed with SIGKILL cannot clean up, so the
name carries the run's pid (``<prefix><pid>-…``): the next run tells a dead run's directory from a live
one's and removes it.

Those places are shared with everyone, so nothing here trusts a name or follows a symlink: each entry
is opened through a descriptor of the parent with ``O_NOFOLLOW | O_DIRECTORY`` and judged by ``fstat``
of what was opened. A symlink, a file, another user's directory, a pid that lives (or is no pid at all)
is left alone, and nothing that goes wrong here stops the run: this is housekeeping.
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


def make_run_dir(parent: Path, prefix: str) -> Path:
    """A new ``0700`` directory ``<prefix><pid>-…`` in *parent*, after removing killed runs' ones."""
    remove_leftovers(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Remove the run directories of killed runs in *parent*: real directories we own, pid gone."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    try:
        top = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # mkdtemp says what is wrong with the directory
    try:
        for name in os.listdir(top):
            m = pattern.match(name)
            if not m or _may_be_alive(int(m.group(1))):
                continue
            try:
                if _remove_own_dir(top, name):
                    log.info("removed %s, left by a killed run", parent / name)
            except OSError as exc:
                log.warning("cannot remove %s, left by a killed run: %s", parent / name, exc.strerror or exc)
    except OSError as exc:
        log.debug("cannot list %s for leftovers of killed runs: %s", parent, exc)
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
        for child in os.listdir(fd):  # a run directory is flat: sockets, logs, targets
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


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory from ``/`` down to *path* that user *uid* (primary group *gid*, plus the
    supplementary groups the user database gives it) cannot traverse, or None if it can reach *path*.

    For handing a directory to another user's process (libvirt's QEMU): ``os.access`` answers only for
    ourselves. Classic mode bits only; an ACL that would grant access is not seen (the error then asks
    for a directory it can traverse, which is the safe mistake).
    """
    import pwd

    groups = {gid}
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        pass
    path = Path(os.path.abspath(path))
    for d in [*reversed(path.parents), path]:
        try:
            st = os.stat(d)
        except OSError:
            return d
        if uid == 0:
            continue
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None
