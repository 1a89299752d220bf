"""Where restored bytes go through QEMU: a qcow2 served by ``qemu-nbd`` + libnbd (overlays, very sparse
disks), and what every target shares (private files and directories, ``qemu-img create``). Fresh dense
images are written without NBD: :mod:`.direct`.

``qemu-img``/``qemu-nbd`` own the qcow2 format, so a restored image is exactly what QEMU itself would
write — fleece never produces qcow2 metadata on its own (:mod:`.direct` writes only data, into metadata
``qemu-img`` preallocated). Several libnbd connections share one ``qemu-nbd`` (``-e``), one per restore
worker.

Zeros are handled by what the target must show:

* a fresh image (a full's base, a flat image) already reads as zero, so zero runs are skipped and the
  image stays thin;
* an overlay must *mask* its backing file, so ``ZERO`` entries — and zero runs inside data — are written
  as NBD write-zeroes (qcow2 zero clusters: no data allocated, older data hidden).

A restored image holds everything the guest had, secrets included, so every file restore makes exists
with its final, private mode from its first instant (:func:`create_file`): made here with ``O_EXCL |
O_NOFOLLOW`` and *mode* (``0600`` unless the user asks otherwise), then formatted by ``qemu-img create``,
which keeps the mode of a file that exists (a file it made itself would be ``0644`` minus the umask).
Directories get the same bits plus search wherever read is granted (:func:`dir_mode`: ``0600`` → ``0700``,
``0640`` → ``0750``). Modes are exact: applied with ``fchmod``, whatever the umask.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import stat
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import nbd

from fleece.repository.errors import RestoreError

log = logging.getLogger(__name__)

ZERO_GRAIN = 64 << 10  # zero detection granularity inside data (the qcow2 cluster size of most images)
TERM_WAIT = 20  # seconds qemu-nbd gets to exit after the first SIGTERM
TERM_RETRY = 0.5  # seconds between SIGTERMs
FILE_MODE = 0o600  # restored images, unless the user asks for another mode


class Target(Protocol):
    """What restore writes into; ``writer()`` gives each worker thread its own handle."""

    def writer(self) -> Writer: ...

    def close(self) -> None: ...


class Writer(Protocol):
    def pwrite(self, data: memoryview | bytes, offset: int) -> None: ...

    def zero(self, length: int, offset: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def qemu_img(*args: str) -> str:
    try:
        return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        if exc.returncode in (-signal.SIGINT, -signal.SIGTERM):  # the same Ctrl-C that is reaching us
            raise KeyboardInterrupt from None
        raise RestoreError(f"qemu-img {args[0]} failed: {exc.stderr.strip()}") from None
    except FileNotFoundError:
        raise RestoreError("qemu-img not found: install qemu-utils (tools/setup does)") from None


def dir_mode(file_mode: int) -> int:
    """The mode of a directory holding files of *file_mode*: the same bits, searchable where readable."""
    return file_mode | (file_mode & 0o444) >> 2


def make_dir(path: Path, mode: int) -> None:
    """``mkdir`` with exactly *mode* (a setgid bit the directory inherits from its parent stays)."""
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o777 != mode:  # the umask took bits away
            os.fchmod(fd, mode | st.st_mode & stat.S_ISGID)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int) -> list[Path]:
    """*path* and its missing parents, each made with :func:`make_dir`; what exists is left as it is.

    Returns the directories made here, outermost first: a failed restore removes them again if empty.
    """
    if path.is_dir():
        return []
    made = []
    if not path.parent.is_dir() and path.parent != path:
        made = make_dirs(path.parent, mode)
    try:
        make_dir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise
        return made
    return [*made, path]


def remove_empty_dirs(made: list[Path]) -> None:
    """Undo :func:`make_dirs`: remove what it made, innermost first, as long as it is empty."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty (or gone): it, and so its parents, stay


def create_file(path: Path, mode: int = FILE_MODE, flags: int = os.O_WRONLY) -> int:
    """Create *path* (it must not exist, and a symlink there is never followed) with exactly *mode*."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise RestoreError(f"cannot create {path}: {exc.strerror or exc}", object=str(path)) from None
    try:
        os.fchmod(fd, mode)  # exact, whatever the umask took away
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_qcow2(path: Path, size: int, options: dict[str, Any], backing: str | None = None,
                 mode: int = FILE_MODE, preallocation: str | None = None, backing_format: str = "qcow2") -> None:
    """A qcow2 like the source (cluster size, compat); *backing* is a name relative to *path*'s directory;
    *preallocation* ``"metadata"`` for :class:`fleece.restore.direct.PreallocatedQcow2`.

    The file is created first, with *mode* (:func:`create_file`): it never exists with broader
    permissions, not even between ``qemu-img``'s ``open`` and a ``chmod``.
    """
    os.close(create_file(path, mode))
    opts = [f"{k}={v}" for k, v in sorted(options.items()) if k in ("cluster_size", "compat")]
    if preallocation is not None:
        opts.append(f"preallocation={preallocation}")
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_format]
    try:
        qemu_img(*args, str(path), str(size))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class NbdWriter:
    def __init__(self, socket_path: str) -> None:
        # qemu-nbd creates its socket file (bind) a moment before it listens: a connect in between is
        # refused. Retry that one error briefly; a handle whose connect failed is dead, so make a new one.
        deadline = time.monotonic() + 10
        while True:
            self.h = nbd.NBD()
            try:
                self.h.connect_unix(socket_path)
                return
            except nbd.Error as exc:
                # python3-libnbd's Error.errno is the symbol's *name* ("ECONNREFUSED"); errnum is the number
                if exc.errnum != errno.ECONNREFUSED or time.monotonic() > deadline:
                    raise
                del self.h
                time.sleep(0.02)

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        self.h.pwrite(data, offset)

    def zero(self, length: int, offset: int) -> None:
        self.h.zero(length, offset)

    def flush(self) -> None:
        self.h.flush()

    def close(self) -> None:
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        finally:
            del self.h  # frees the handle and closes its socket now, not whenever the GC runs


def direct_io_supported(path: Path) -> bool:
    """Whether *path*'s filesystem takes O_DIRECT (tmpfs before Linux 6.6 and some FUSE mounts do not)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise RestoreError(f"cannot open {path}: {exc.strerror}") from None
    os.close(fd)
    return True


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SOCKETS = itertools.count()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the thread that forked it ends.

    A fleece killed with SIGKILL cannot stop its qemu-nbd, which would serve (and hold the lock on) a
    half-written image forever. Everything the child runs is looked up here, before the fork: between
    fork and exec it only calls ``prctl`` and ``getppid`` (no import, no lock another thread might have
    held at the fork). If fleece died before ``prctl`` took effect, the child is already an orphan and
    leaves at once. SIGKILL, not SIGTERM: qemu-nbd 7.2 can miss a SIGTERM (see ``_terminate``), and what
    it served is a partial image the next restore removes anyway.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux/glibc: no parent-death signal, as before
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    getppid, exit_now = os.getppid, os._exit

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if getppid() != parent:
            exit_now(1)

    return preexec


class QemuNbdTarget:
    """A qcow2 served read-write by a private ``qemu-nbd`` on a unix socket.

    qemu-nbd makes clients beyond its ``-e`` limit wait forever, so it is sized for every worker plus
    the caller's own connection. It writes with O_DIRECT where the filesystem allows: a restore writes
    each byte once and nobody reads it soon, and going around the page cache saved ~1 s of kernel CPU per
    1.8 GB restored on the benchmark machine (page-cache copies and inode-lock spinning between
    qemu-nbd's I/O threads).

    qemu-nbd dies with the *thread* that makes the target (``PR_SET_PDEATHSIG`` fires when the forking
    thread ends, not the process): make and close it in one thread that outlives it — restore does both
    in the caller's thread, which waits for the whole restore; never in a pool worker. Its socket has a
    short name: a unix socket path must stay under 108 bytes, and ``$TMPDIR`` can be long.
    """

    def __init__(self, image: Path, run_dir: Path, connections: int) -> None:
        self.image = image
        self.socket = str(run_dir / f"nbd-{next(_SOCKETS)}.sock")
        Path(self.socket).unlink(missing_ok=True)
        (run_dir / f"{image.name}.qemu-nbd.log").unlink(missing_ok=True)  # same layer name, another disk
        log_file = os.fdopen(create_file(run_dir / f"{image.name}.qemu-nbd.log"), "wb")
        self.direct = direct_io_supported(image)
        cache = ["--cache=none", "--aio=native"] if self.direct else ["--cache=writeback"]
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", "qcow2", "-k", self.socket, "--persistent", "-e", str(connections + 1),
             *cache, "--discard=unmap", str(image)],
            # Its own session: a Ctrl-C on the terminal signals fleece's whole process group, and a
            # qemu-nbd that died with it would turn the orderly unwind into "nbd_flush: CLOSED" errors.
            # fleece stops it itself (close()), after the last flush. It must not outlive fleece, though:
            # it dies with the thread that started it (_die_with_parent), even by SIGKILL.
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
            preexec_fn=_die_with_parent())
        self._log = run_dir / f"{image.name}.qemu-nbd.log"
        self._writers: list[NbdWriter] = []
        self._lock = threading.Lock()
        try:
            log_file.close()
            deadline = time.monotonic() + 30
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RestoreError(f"qemu-nbd did not start for {image}: {self._log.read_text().strip()}")
                time.sleep(0.01)
        except BaseException:
            # Nobody holds this target yet, so nobody will close() it: an interruption (SIGTERM is a
            # KeyboardInterrupt here) while qemu-nbd starts must stop it now, not leave it to the
            # parent-death signal at fleece's exit, which lands after fleece is gone.
            self.proc.kill()
            self.proc.wait()
            raise

    def writer(self) -> NbdWriter:
        w = NbdWriter(self.socket)
        with self._lock:
            self._writers.append(w)
        return w

    def close(self) -> None:
        """Flush every connection, then let qemu-nbd close the image cleanly.

        Once every connection's NBD flush has returned, qemu-nbd has written the qcow2 metadata and
        fsync'ed the image: the bytes are durable. A qemu-nbd that still fails to exit is killed, and the
        image is accepted only if ``qemu-img check`` finds it consistent (leaked clusters, harmless, are
        repaired).
        """
        try:
            for w in self._writers:
                w.flush()
        finally:
            for w in self._writers:
                w.close()
            self._writers.clear()
            rc = self._terminate()
        if rc is None:
            log.warning("qemu-nbd did not exit %ds after SIGTERM for %s; killed it, checking the image",
                        TERM_WAIT, self.image)
            self._check_after_kill()
        elif rc not in (0, -15):
            raise RestoreError(f"qemu-nbd failed for {self.image}: {self._log.read_text().strip()}")

    def _terminate(self) -> int | None:
        """SIGTERM qemu-nbd until it exits; ``None`` if it had to be killed.

        qemu-nbd 7.2 sometimes loses the wake-up of its main loop when SIGTERM arrives (it then sleeps
        forever with the signal already handled); a second SIGTERM always woke it in our tests, so the
        signal is repeated every half second.
        """
        deadline = time.monotonic() + TERM_WAIT
        while True:
            self.proc.terminate()
            try:
                return self.proc.wait(TERM_RETRY)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    break
        self.proc.kill()
        self.proc.wait()
        return None

    def _check_after_kill(self) -> None:
        try:
            repair_leaks(self.image)
        except RestoreError as exc:
            raise RestoreError(f"qemu-nbd had to be killed and {exc}; run the restore again") from None


def repair_leaks(image: Path) -> None:
    """Accept a qcow2 that a killed qemu-nbd wrote if ``qemu-img check`` finds it consistent; leaked
    clusters (harmless: space the metadata no longer references) are freed, anything worse is an error."""
    def check(*repair: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-img", "check", "-q", *repair, "-f", "qcow2", str(image)],
                              capture_output=True, text=True)

    res = check()
    if res.returncode == 3:  # only leaked clusters: free them
        res = check("-r", "leaks")
    if res.returncode != 0:
        raise RestoreError(f"{image} is inconsistent ({res.stdout.strip() or res.stderr.strip()})")
