"""The part of a run directory that QEMU itself writes into, when QEMU runs as another user.

A backup's run directory (rundir.py) is 0700 and fleece's: it holds the copy-before-write scratch images
(guest data) and the NBD socket. QEMU creates that socket and opens those images — fine when QEMU runs as
fleece's user, EACCES when it does not: a stock libvirt runs QEMU as ``libvirt-qemu`` (DAC label
``+64055:+64055``), a hand-started QEMU may drop to a user with ``-runas``, and fleece runs as root.

So, run as root, fleece makes the run directory 0711 and gives QEMU's user a 0700 subdirectory ``qemu`` of
its own, for the one thing QEMU must *create*: the NBD socket. The scratch images stay in the run
directory, which QEMU's user can traverse but not write — chowned to that user once fleece (or libvirtd)
has made them, 0600. Not in the subdirectory: there QEMU's user (shared by every domain's QEMU under a
stock libvirt) could swap a file fleece is about to write as root for a symlink to any file on the host.
The run directory stays root's, so a killed run's is still recognised and removed
(rundir.remove_leftovers). Not root and QEMU another user: no way to share a private directory with it
(the error says to run as root). Every directory on the way to ``--scratch`` must be traversable by
QEMU's user, or the error names the one that is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleece.repository import rundir
from fleece.repository.errors import UsageError

SUBDIR = "qemu"


def socket_dir(run_dir: Path, owner: tuple[int, int] | None, who: str, scratch: Path) -> Path:
    """The directory QEMU (running as *owner* ``(uid, gid)``; None or fleece's own uid: no hand-over)
    creates its NBD socket in: *run_dir* itself, or its ``qemu`` subdirectory handed to QEMU's user (and
    *run_dir* made traversable for it). *who* names the QEMU for messages ("the QEMU of domain vm1")."""
    if owner is None or owner[0] == os.geteuid():
        return run_dir
    uid, gid = owner
    if os.geteuid() != 0:
        raise UsageError(f"{who} runs as uid {uid}, which cannot use the private run directory of fleece "
                         f"(uid {os.geteuid()}); run fleece as root", object=str(run_dir))
    blocked = rundir.unreachable(run_dir.parent, uid, gid)
    if blocked is not None:
        raise UsageError(f"{who} runs as uid {uid}, which cannot enter {blocked} (mode "
                         f"{blocked.stat().st_mode & 0o7777:04o}) on the way to --scratch {scratch}: pass a "
                         "--scratch it can traverse (e.g. /var/tmp)", object=str(scratch))
    os.chmod(run_dir, 0o711)
    sub = run_dir / SUBDIR
    os.mkdir(sub, 0o700)
    os.chown(sub, uid, gid)
    return sub


def give(path: Path, owner: tuple[int, int] | None) -> None:
    """Chown a file fleece made for QEMU (a scratch image, 0600, in the root-owned run directory) to
    QEMU's user, if it runs as another one."""
    if owner is not None and owner[0] != os.geteuid():
        os.chown(path, *owner, follow_symlinks=False)
