"""What a restore checks before it does any work: that ``--out`` can take the images, and that nothing
it would replace (or write into) is open in a running QEMU.

Replacing an image a QEMU has open is silent data loss: the rename or unlink succeeds, QEMU keeps
reading and writing the old, now nameless inode, and every write the guest makes from then on vanishes
with that VM's process. ``--force`` means "replace my old restore", never that.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from fleece.repository.errors import UsageError

log = logging.getLogger(__name__)

# QEMU's image locks (block/file-posix.c): one byte per block permission at RAW_LOCK_PERM_BASE + bit (the
# permissions a user holds) and at RAW_LOCK_SHARED_BASE + bit (the ones it does not share), taken as OFD
# locks. Permissions are a 64-bit mask, so 64 bytes from each base cover every QEMU, present and future.
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
PERM_BITS = 64
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)  # Linux, every architecture
_FLOCK = "@hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (64-bit off_t)


def held_by_qemu(path: Path) -> bool:
    """Whether a QEMU (a VM, qemu-nbd, qemu-img, …) holds its image lock on the file at *path*.

    Why OFD locks directly rather than ``qemu-img info`` without ``-U``: that asks QEMU whether *it*
    could open the image, which only fails when someone holds the *write* permission — a VM's backing
    files, opened read-only, pass, yet replacing them under the VM is as wrong — and deciding on its
    error text ("Failed to get shared "write" lock") would tie us to QEMU's wording. ``F_OFD_GETLK``
    asks the kernel whether any lock in QEMU's byte ranges would conflict with an exclusive one: no
    subprocess, no text, and every QEMU that opened the file counts, whatever it opened it for. (Our own
    open and close of the file cannot release anyone's OFD lock: they belong to the holder's open file.)

    Files QEMU opened with ``locking=off`` carry no lock and cannot be recognised. A file we cannot open
    or query is reported as not held, with a warning: this check must not make restores impossible on a
    filesystem without OFD locks.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            log.warning("cannot tell whether a QEMU uses %s (%s); replacing it", path, exc.strerror or exc)
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        for base in (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE):
            query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, base, PERM_BITS, 0)
            if struct.unpack(_FLOCK, fcntl.fcntl(fd, F_OFD_GETLK, query))[0] != fcntl.F_UNLCK:
                return True
        return False
    except OSError as exc:
        log.warning("cannot tell whether a QEMU uses %s (%s); replacing it", path, exc.strerror or exc)
        return False
    finally:
        os.close(fd)


def _files(path: Path) -> Iterator[Path]:
    """*path* if it is a regular file, every regular file below it if it is a directory; no symlink is
    followed (replacing a symlink removes the link, never what it points to)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        yield path
    elif stat.S_ISDIR(st.st_mode):
        for dirpath, _, filenames in os.walk(path):  # followlinks=False
            for name in sorted(filenames):
                yield Path(dirpath, name)


def refuse_in_use(paths: Iterable[Path]) -> None:
    """Raise :class:`UsageError` for the first file at or below *paths* that a running QEMU holds."""
    for top in paths:
        for f in _files(top):
            if held_by_qemu(f):
                raise UsageError(f"{f} is in use (a running QEMU holds its lock): stop that VM first, or restore "
                                 "into another --out", object=str(f))


def check_out(out: Path) -> None:
    """``--out`` must be a directory this user can create files in, or be creatable (its nearest existing
    ancestor such a directory): found now, not as "Permission denied" after minutes of fetching."""
    probe = out.absolute()
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        why = "" if probe == out.absolute() else f" and cannot be made one: {probe} is not a directory"
        raise UsageError(f"--out {out} is not a directory{why}", object=str(out))
    effective = os.access in os.supports_effective_ids
    if os.access(probe, os.W_OK | os.X_OK, effective_ids=effective):
        return
    where = "" if probe == out.absolute() else f" ({probe}, where it would be made)"
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only filesystem" if read_only else "does not let this user create files in it"
    raise UsageError(f"--out {out} is not writable: it{where} {why}; restore into another --out",
                     object=str(out))
