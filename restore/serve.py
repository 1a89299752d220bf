"""Serve the disks of a point as NBD exports straight from the repository (``fleece serve``).

The server is nbdkit running this package's Python plugin (:mod:`.nbdkit_plugin`, the work in
:mod:`.reader`): nbdkit speaks NBD (multi-conn, block status, structured replies, TLS if ever wanted) and
its ``cow`` filter makes a read-only export writable without a byte reaching the repository — the guest's
writes live in a temporary overlay that is gone when the server stops.

What the launcher (:class:`Server`) guarantees:

* **One point, fixed.** The point is resolved here (``latest`` included) and handed to the plugin by its
  full id: a backup committing while the server runs cannot change what a booted guest sees.
* **Errors before serving.** Point, disks and key are checked here and the plugin opens everything before
  nbdkit listens; ready means every disk's extent map and blob locations are known. A plugin that fails
  to start says why in one line (through a status pipe), which :class:`ServeError` carries.
* **The key never touches a file or the environment**: the unlocked master key goes to the plugin through
  an inherited pipe (``keyfd``), as the paper-key text the repository already accepts, read once.
* **Private**: whoever can connect reads the disk, so the Unix socket is ``0600`` before anyone can reach
  it — nbdkit makes its sockets ``0755`` whatever the umask, so it binds inside a fresh ``0700`` directory
  next to the path asked for, and the socket is chmodded and then hard-linked into place (never over
  anything: a path that appeared meanwhile is an error); a TCP port listens on 127.0.0.1 unless told otherwise, and the ``cow`` overlay and the
  pid file live in a ``0700`` run directory removed at the end.
* **Nothing left running**: the plugin holds the read end of a *lifeline* pipe whose write end only this
  process has; when it closes (this process exits, however it dies) the plugin ends nbdkit at once.
  nbdkit's own ``--exit-with-parent`` sends SIGTERM, after which nbdkit waits for its clients for as long
  as they stay connected (measured), and a parent-death SIGKILL did not reach it once a client was
  connected (measured too). :meth:`Server.stop` (SIGTERM, Ctrl-C) stops it and waits for it to be gone.
* **No credentials in nbdkit's environment**: the ``FLEECE_*`` secrets are removed (the key comes through
  the pipe), and the ``AWS_*`` ones too unless the repository is in S3 (the plugin's boto3 needs them).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleece.repository import Manifest, Repository, rundir
from fleece.repository.credentials import PASSWORD_VARIABLES
from fleece.repository.crypto import MasterKey, export_paper
from fleece.repository.errors import HostError, KeyAccessError, ServeError, UsageError

from .restore import select_disks

log = logging.getLogger(__name__)

RUN_PREFIX = "fleece-serve-"
BIND_PREFIX = ".fs-"  # short: the socket path must stay under 108 bytes
PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")
#: the longest Unix socket path (sun_path holds 108 bytes with the NUL)
MAX_SOCKET_PATH = 107
#: credential variables nbdkit never needs (the key goes through a pipe)
SECRET_VARIABLES = ("FLEECE_KEY_FILE", *PASSWORD_VARIABLES,
                    "FLEECE_NEW_PASSWORD", "FLEECE_NEW_PASSWORD_FILE", "FLEECE_NEW_PASSWORD_COMMAND")
#: seconds nbdkit gets to open the repository and listen (an S3 bucket far away, a large index)
START_TIMEOUT = 120.0
#: seconds nbdkit gets to finish after SIGTERM before it is killed. nbdkit stops accepting on SIGTERM but
#: then waits for every connected client to disconnect (measured: an idle client kept it up for as long as
#: it stayed connected, a second signal changes nothing) — a stop with a VM still attached must not wait
#: for that VM, and killing nbdkit loses nothing (read-only plugin; the cow overlay is meant to go)
STOP_TIMEOUT = 2.0


@dataclass
class ServeRequest:
    vm: str
    point: str | None = None  # None / "latest": the newest point
    disks: list[str] | None = None  # None: every disk of the point's view
    socket: Path | None = None
    port: int | None = None
    bind: str = "127.0.0.1"
    writable: bool = False
    cache_bytes: int = 64 << 20
    workers: int = 4
    readahead: int = 16 << 20
    verbose: int = 0  # 1: the plugin's info logs (what is served, each disk's stats at the end); 2: nbdkit's too


@dataclass
class ServePlan:
    """What will be served: the point, each disk's layer point, the default export (``""`` if none)."""

    point: Manifest
    view: dict[str, Manifest]
    disks: list[str]
    default: str
    sizes: dict[str, int] = field(default_factory=dict)


def plan_serve(repo: Repository, req: ServeRequest) -> ServePlan:
    """Resolve the point and its disks. The default export is the disk named by a single ``--disk``, or
    the VM's only disk: ``qemu-img info nbd+unix:///?socket=…`` then needs no export name."""
    if repo.encrypted and repo.keys is not None and not repo.keys.can_read:
        raise KeyAccessError("this key can only add backups (write-only): serving a disk reads it, which needs a "
                             "full key (a passphrase or key file of a full key slot)")
    manifest, view, disks = select_disks(repo, req.vm, req.point, req.disks)
    default = disks[0] if len(disks) == 1 else ""
    return ServePlan(manifest, view, disks, default, {d: view[d].disks[d].virtual_size for d in disks})


def uri(req: ServeRequest, export: str = "") -> str:
    """The NBD URI a client uses for *export* (``""``: the default export)."""
    if req.socket is not None:
        return f"nbd+unix:///{export}?socket={req.socket}"
    host = req.bind if ":" not in req.bind else f"[{req.bind}]"
    return f"nbd://{host}:{req.port}/{export}"


class Server:
    """One running nbdkit serving :class:`ServePlan` (see the module docstring)."""

    def __init__(self, repo: Repository, req: ServeRequest, plan: ServePlan,
                 endpoint: str | None = None) -> None:
        """With neither ``req.socket`` nor ``req.port``, the server is for this process's own clients
        (live restore's images, mount's nbdfuse): its socket is ``nbd.sock`` in the private run directory,
        set into ``req.socket`` by :meth:`start`, and goes with that directory."""
        if req.socket is not None and req.port is not None:
            raise UsageError("give one of --socket PATH or --port N: where clients connect")
        self._private = req.socket is None and req.port is None
        self.repo = repo
        self.req = req
        self.plan = plan
        self.endpoint = endpoint
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir: Path | None = None
        self._bind_dir: Path | None = None  # where nbdkit binds the socket before it is private
        self._socket_ino: int | None = None  # the socket put in place (removed at stop only if still ours)
        self._lifeline: int | None = None  # write end of the pipe whose closing ends nbdkit

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------------------------

    def _check_socket(self) -> None:
        path = self.req.socket
        assert path is not None
        if not path.parent.is_dir():
            raise UsageError(f"--socket {path}: directory {path.parent} does not exist")
        # nbdkit binds <parent>/.fs-<pid>-XXXXXXXX/s first: that path must fit too
        longest = max(len(os.fsencode(path)), len(os.fsencode(path.parent)) + len(f"/.fs-{os.getpid()}-xxxxxxxx/s"))
        if longest > MAX_SOCKET_PATH:
            raise UsageError(f"--socket {path} is too long for a Unix socket ({longest} > {MAX_SOCKET_PATH} bytes with "
                             "the temporary name it is bound under first): choose a shorter path")
        if os.path.lexists(path):
            if not path.is_socket():
                raise UsageError(f"--socket {path} exists and is not a socket: choose another path")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
            except OSError:
                log.info("removing the stale socket %s (nothing listens on it)", path)
                path.unlink()
            else:
                raise UsageError(f"--socket {path} is in use by a running server: stop it or choose another path")
            finally:
                probe.close()

    def _key_pipe(self) -> int | None:
        """The read end of a pipe holding the key for the plugin (``None``: plaintext repository)."""
        keys = self.repo.keys
        if not self.repo.encrypted:
            return None
        if not isinstance(keys, MasterKey):
            raise KeyAccessError("serving a disk needs a full key of the repository")
        r, w = os.pipe()
        try:
            os.write(w, export_paper(keys).encode())  # ~80 bytes: far below a pipe's buffer
        finally:
            os.close(w)
        return r

    def command(self, keyfd: int | None, statusfd: int, pidfile: Path, lifefd: int = -1) -> list[str]:
        req, plan = self.req, self.plan
        cmd = ["nbdkit", "--foreground", "--exit-with-parent", "-P", str(pidfile)]
        if self._private:
            cmd += ["-U", str(req.socket)]
        elif req.socket is not None:
            assert self._bind_dir is not None
            cmd += ["-U", str(self._bind_dir / "s")]
        else:
            cmd += ["-i", req.bind, "-p", str(req.port)]
        if req.writable:
            cmd += ["--filter=cow"]
        else:
            cmd += ["--readonly"]
        if req.verbose >= 2:
            cmd += ["--verbose"]
        sitedirs = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        params = {"sitedirs": sitedirs, "repo": self.repo.url, "endpoint": self.endpoint or "",
                  "vm": plan.point.vm, "point": plan.point.id, "disks": ",".join(plan.disks),
                  "default": plan.default, "statusfd": str(statusfd), "cache": str(req.cache_bytes),
                  "workers": str(req.workers), "readahead": str(req.readahead),
                  "verbose": "1" if req.verbose else ""}
        if keyfd is not None:
            params["keyfd"] = str(keyfd)
        if lifefd >= 0:
            params["lifefd"] = str(lifefd)
        return cmd + ["python", str(PLUGIN)] + [f"{k}={v}" for k, v in params.items()]

    def start(self) -> None:
        """Start nbdkit and return once it accepts connections; :class:`ServeError` if it cannot."""
        if self.req.socket is not None and not self._private:
            self._check_socket()
        if shutil.which("nbdkit") is None:
            raise HostError("nbdkit is not installed: install Debian's nbdkit and nbdkit-plugin-python "
                            "(tools/setup does)")
        self.run_dir = rundir.make_run_dir(Path(tempfile.gettempdir()), RUN_PREFIX)
        if self._private:  # the run directory is 0700: the socket needs no placing
            self.req.socket = self.run_dir / "nbd.sock"
        elif self.req.socket is not None:  # named with the pid: a killed run's is removed by the next one
            self._bind_dir = rundir.make_run_dir(self.req.socket.parent, BIND_PREFIX)
        pidfile = self.run_dir / "nbdkit.pid"
        keyfd = self._key_pipe()
        status_r, status_w = os.pipe()
        life_r, self._lifeline = os.pipe()  # the write end stays here, not inheritable: see the module doc
        fds = [status_w, life_r] + ([keyfd] if keyfd is not None else [])
        env = {k: v for k, v in os.environ.items()
               if k not in SECRET_VARIABLES and (self.repo.url.startswith("s3://") or not k.startswith("AWS_"))}
        env["TMPDIR"] = str(self.run_dir)  # the cow filter's overlay: private, removed with it
        try:
            self.proc = subprocess.Popen(self.command(keyfd, status_w, pidfile, life_r), pass_fds=fds, env=env,
                                         stdin=subprocess.DEVNULL, umask=0o077, start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            self._wait_ready(pidfile, status_r)
            if self._bind_dir is not None:
                self._place_socket()
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(status_r)
        log.info("serving VM %s point %s (%s) at %s", self.plan.point.vm, self.plan.point.id,
                 ", ".join(self.plan.disks), uri(self.req, self.plan.default))

    def _wait_ready(self, pidfile: Path, status_r: int) -> None:
        """Until nbdkit has written its pid file — which it does once it listens (nbdkit(1), ``-P``)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.005
        while True:
            code = self.proc.poll()
            if code is not None:
                os.set_blocking(status_r, False)
                try:
                    said = os.read(status_r, 4096).decode(errors="replace").strip()
                except BlockingIOError:
                    said = ""
                raise ServeError(said or f"nbdkit exited with status {code} before serving (its messages are "
                                         "above; -v shows more)")
            try:
                if pidfile.read_text().strip():
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"nbdkit did not start serving within {START_TIMEOUT:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _place_socket(self) -> None:
        assert self._bind_dir is not None and self.req.socket is not None
        bound = self._bind_dir / "s"
        os.chmod(bound, 0o600)
        try:
            os.link(bound, self.req.socket)
        except FileExistsError:
            raise UsageError(f"--socket {self.req.socket} appeared while the server started: choose another "
                             "path") from None
        self._socket_ino = os.stat(self.req.socket).st_ino
        os.unlink(bound)
        self._remove_bind_dir()

    def _remove_bind_dir(self) -> None:
        if self._bind_dir is not None:
            shutil.rmtree(self._bind_dir, ignore_errors=True)
            self._bind_dir = None

    # -- run and stop -----------------------------------------------------------------------------------

    def wait(self) -> int:
        """Until nbdkit exits (it does not on its own: a stop, or a crash); its status."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self) -> None:
        """Stop nbdkit (SIGTERM; killed after :data:`STOP_TIMEOUT`) and remove the run directory. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.info("nbdkit still had clients connected %.0f s after SIGTERM: killed", STOP_TIMEOUT)
                proc.kill()
                proc.wait()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._socket_ino is not None:
            try:
                if os.stat(self.req.socket).st_ino == self._socket_ino:  # type: ignore[arg-type]
                    os.unlink(self.req.socket)  # type: ignore[arg-type]
            except OSError:
                pass
            self._socket_ino = None
        self._remove_bind_dir()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
