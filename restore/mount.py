"""File-level restore: a point's disk as a read-only file on the host, through FUSE (``fleece mount``).

The disk is served (:mod:`.serve`) and ``nbdfuse`` (libnbd's FUSE client) shows it as one regular file,
``MOUNTPOINT/<disk>``, read-only: any tool that reads images reads it — ``mount -o ro,loop`` for a
filesystem, ``losetup -r -P`` for a partitioned disk, ``qemu-img convert`` for a copy, ``debugfs`` or
``7z`` without mounting at all. Only the blocks read are fetched (and verified) from the repository.

Why FUSE and not the kernel's ``nbd`` module: the module is often missing (containers, minimal or cloud
kernels — this project's CI machine has none) and needs ``nbd-client``; FUSE needs ``/dev/fuse`` only,
and the mount is private to the user who made it (no ``allow_other``). Where neither ``/dev/fuse`` nor
``nbdfuse`` is present, :class:`Mount` says so and what to do instead (``fleece serve`` + any NBD client).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from fleece.repository.errors import HostError, ServeError, UsageError

from .serve import Server, uri

log = logging.getLogger(__name__)

#: seconds nbdfuse gets to show the file
START_TIMEOUT = 30.0


def check_fuse() -> None:
    """:class:`HostError` with what to do when this machine cannot mount through FUSE."""
    if shutil.which("nbdfuse") is None:
        raise HostError("nbdfuse is not installed (Debian: libnbd-bin or nbdfuse): install it, or use "
                        "'fleece serve' and any NBD client (qemu-img, qemu-nbd --connect, nbdcopy)")
    if not os.path.exists("/dev/fuse"):
        raise HostError("/dev/fuse is missing: this machine (or container) has no FUSE; load the fuse module, or "
                        "use 'fleece serve' and any NBD client (qemu-img, qemu-nbd --connect, nbdcopy)")


class Mount:
    """``nbdfuse`` showing one served disk as ``mountpoint/<disk>``; :meth:`stop` unmounts."""

    def __init__(self, server: Server, disk: str, mountpoint: Path) -> None:
        self.server = server
        self.disk = disk
        self.mountpoint = mountpoint.absolute()
        self.path = self.mountpoint / disk
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        check_fuse()
        if not self.mountpoint.is_dir():
            raise UsageError(f"mount point {self.mountpoint} is not a directory: create it (an empty directory)")
        if os.path.ismount(self.mountpoint):
            raise UsageError(f"{self.mountpoint} is a mount point already: unmount it or choose another directory")
        if any(self.mountpoint.iterdir()):
            raise UsageError(f"{self.mountpoint} is not empty: mount on an empty directory")
        sock = self.server.req.socket
        assert sock is not None, "mount serves on a Unix socket"
        cmd = ["nbdfuse", "-r", str(self.path), "--unix", str(sock)]
        if shutil.which("setpriv"):  # a killed fleece: nbdfuse gets SIGTERM, on which it unmounts and exits
            cmd = ["setpriv", "--pdeathsig", "TERM", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        size = self.server.plan.sizes[self.disk]
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise ServeError(f"nbdfuse exited with status {code} before the disk appeared (its messages are "
                                 "above)")
            try:
                if os.path.ismount(self.mountpoint) and self.path.stat().st_size == size:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"nbdfuse did not show {self.path} within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Unmount (lazily if a reader still holds the file) and wait for nbdfuse. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if os.path.ismount(self.mountpoint):
            for cmd in (["fusermount3", "-u", str(self.mountpoint)], ["umount", str(self.mountpoint)],
                        ["umount", "-l", str(self.mountpoint)]):
                if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("nbdfuse did not exit after the unmount: killed")
            proc.kill()
            proc.wait()

    def describe(self) -> str:
        return f"{self.path} (read-only; served at {uri(self.server.req, self.disk)})"
