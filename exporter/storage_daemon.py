"""qemu-storage-daemon on a shut-off VM's images, so the backup code that drives QEMU drives it too.

``qemu-storage-daemon`` (QEMU's block layer without a guest) speaks QMP, ``blockdev-add``, dirty bitmaps,
copy-before-write, snapshot-access and NBD exports. Opened in it, a shut-off VM's qcow2 shows the persistent
bitmaps its last running backup left, and the run is the same as for a running VM — minus the guest: no
device to put the filter in front of (nothing writes the image but fleece), no pause, no name, no status.

Why a daemon per run and not ``qemu-nbd``: the bitmaps must be *changed* (the new point's one added, the
parent's dropped after the commit), which needs QMP; and the daemon stores them back into the qcow2 when it
closes the image, so the same bitmaps carry on when the VM is started again.

Safety:

* **Locking.** Each image is opened read-write with ``file.locking=on``: QEMU's OFD locks refuse an image
  another process holds (a running VM, a second backup, ``qemu-img`` writing it) — an
  :class:`~fleece.repository.errors.ImageInUseError` before anything is read or written. (An image opened
  elsewhere with ``locking=off`` cannot be detected by anyone.)
* **Unlocking.** The daemon is fleece's child and ends with the run: ``quit``, then SIGTERM, then SIGKILL. A
  fleece killed outright takes it along (``setpriv --pdeathsig TERM``): SIGTERM makes it close the images
  cleanly, bitmaps stored. Were it killed too, the bitmaps are marked in use in the qcow2; QEMU then loads
  them as inconsistent and the next backup is a logged full.
* **Privacy.** Its QMP socket lives in a 0700 run directory under the scratch directory.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fleece.repository import rundir
from fleece.repository.errors import CommandError, ImageInUseError, QemuError

from .bitmaps import PREFIX, disk_token
from .images import Image
from .qmp import Monitor

log = logging.getLogger(__name__)

BINARY = "qemu-storage-daemon"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0  # closing stores the bitmaps and flushes the image: give it time before SIGTERM


class StorageDaemon:
    """One ``qemu-storage-daemon`` for one run; a context manager (``with StorageDaemon(...) as d:``)."""

    def __init__(self, images: list[Image], scratch: Path) -> None:
        self.images = images
        self.scratch = scratch
        self.run_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_path(self) -> str:
        assert self.run_dir is not None
        return str(self.run_dir / "qmp.sock")

    @staticmethod
    def node_name(image: Image) -> str:
        """The format node an image is opened as (a fixed name: nothing of the daemon outlives the run)."""
        return f"img-{disk_token(image.id)}"

    def start(self) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            raise QemuError(f"{BINARY} not found: install qemu-system-common (tools/setup does); it opens "
                            "shut-off images for --image")
        self.run_dir = rundir.make_run_dir(self.scratch, f"{PREFIX}qsd-")
        pidfile = self.run_dir / "qsd.pid"
        cmd = [binary, "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=fleece-qmp",
               "--monitor", "chardev=fleece-qmp", "--pidfile", str(pidfile)]
        if shutil.which("setpriv"):  # fleece killed outright: the daemon gets SIGTERM and closes the images
            cmd = ["setpriv", "--pdeathsig", "TERM", *cmd]
        log_path = self.run_dir / "qsd.log"
        with open(log_path, "wb") as out:
            # its own session: a Ctrl-C at the terminal reaches fleece, which then stops it in order
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_listening(pidfile, log_path)
        except BaseException:
            # a Ctrl-C/SIGTERM while it starts: ``__exit__`` never runs for a failed ``__enter__``, and the
            # parent-death signal would fire only after fleece exited. No image is open yet: just end it.
            proc, self.proc = self.proc, None
            if proc is not None:
                proc.kill()
                proc.wait()
            self.stop()  # the run directory (no "bitmaps may not have been stored" warning: none was open)
            raise

    def _wait_listening(self, pidfile: Path, log_path: Path) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not pidfile.exists():  # written once the monitor socket listens
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                text = log_path.read_text(errors="replace").strip().splitlines()
                raise QemuError(f"{BINARY} exited with status {code} at start: {text[-1] if text else 'no output'}")
            if time.monotonic() > deadline:
                raise QemuError(f"{BINARY} did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def open(self, mon: Monitor) -> dict[str, str]:
        """Open every image read-write under QEMU's lock; ``{disk id: format node}``.

        An image someone else holds raises :class:`ImageInUseError` naming it; the images opened before it
        are closed again by :meth:`stop` (nothing was written to any of them)."""
        nodes: dict[str, str] = {}
        for image in self.images:
            node = self.node_name(image)
            try:
                mon.cmd("blockdev-add", {"driver": image.format, "node-name": node,
                                         "file": {"driver": "file", "filename": image.path, "locking": "on"}})
            except CommandError as exc:
                if "lock" in exc.desc:
                    raise ImageInUseError(
                        f"image {image.path} is in use by another process (a running VM, another backup, "
                        "qemu-img): back a running VM up through its QMP socket (--qmp), or wait until the "
                        "image is free; nothing was read or written", object=image.path) from None
                raise QemuError(f"{BINARY} cannot open image {image.path}: {exc.desc}", object=image.path) from None
            nodes[image.id] = node
        return nodes

    def stop(self) -> None:
        """Close the images (the daemon stores their bitmaps) and end the daemon; idempotent."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                self._end(proc)
        finally:
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            with Monitor(self.qmp_path, timeout=STOP_TIMEOUT, connect_timeout=5) as mon:
                try:
                    mon.cmd("quit")
                except QemuError:
                    pass  # it may close the connection before it answers
        except QemuError as exc:  # its monitor is busy or gone: a signal does the same clean close
            log.debug("%s quit over QMP: %s", BINARY, exc)
            proc.send_signal(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit; sending %s", BINARY, proc.pid, sig.name)
                proc.send_signal(sig)
                continue
            if code != 0:
                log.warning("%s exited with status %d: the images' dirty bitmaps may not have been stored "
                            "(the next backup then is a full)", BINARY, code)
            return
        proc.wait()

    def __enter__(self) -> StorageDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

