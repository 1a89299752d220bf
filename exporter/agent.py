"""``--quiesce``: the guest's filesystems frozen by qemu-guest-agent around the point in time.

A crash-consistent point is what the disk held at one instant: a journaled filesystem recovers from it, an
application with data in flight may not. qemu-guest-agent's ``guest-fsfreeze-freeze`` makes the guest
flush and freeze its filesystems (and run its fsfreeze hooks, where databases checkpoint), so the point
holds clean filesystems. The freeze brackets only the instant the point is fixed (the bitmap switch and
copy-before-write insertion, or libvirt's backupBegin): milliseconds, not the whole backup.

Rules, in order of importance:

* **Always thaw.** A guest left frozen is a guest whose every write blocks: worse than any backup failure.
  The thaw runs whatever ended the ``with`` body (errors, Ctrl-C/SIGTERM, agent timeouts), is retried on a
  fresh connection, and a freeze that timed out is thawed too — the agent may still complete it. A run
  killed outright (SIGKILL, OOM) cannot thaw, so a *guard* process, started before the freeze and told
  when the thaw is done, thaws the guest if its parent dies first (:class:`ThawGuard`).
* **Never thaw what fleece did not freeze.** A guest already frozen by someone else (another tool, an
  administrator) is left so; the point is then crash-consistent with that reason.
* **Never fail a backup for the agent.** No socket, no agent in the guest, a hung agent, a refused freeze:
  the point is taken crash-consistent and the manifest says why (``consistency: crash`` +
  ``extra.quiesce.reason``). Only a thaw that keeps failing is an error in the log.

The wire protocol is the agent's QMP dialect on the host end of its virtio-serial chardev. The channel has
no session: a response to a command that timed out arrives later, into whoever talks next. So every
conversation starts with ``guest-sync-delimited`` (a 0xFF byte resets the agent's parser; its answer is
prefixed with 0xFF and carries our random id), and stale answers before it are dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fleece.repository.errors import AgentError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # an answer longer than this is not the agent's: the channel is garbage
THAW_ATTEMPTS = 3  # a thaw that fails is retried on a fresh connection this often before it is an error
THAW_RETRY_PAUSE = 1.0  # seconds between thaw attempts
GUARD_PATIENCE = 600.0  # seconds the guard of a dead run keeps trying (its guest may be paused until the
#                         next run resumes it, and a paused guest's agent cannot answer)


class Freezer(Protocol):
    """What :func:`quiesced` drives: one guest's agent, through whatever channel reaches it."""

    what: str  # for messages: "the guest agent on /run/vm1/qga.sock", "the agent of domain vm1"

    def freeze(self, arm: Callable[[], None]) -> int:
        """Freeze the guest's filesystems; return how many. Calls *arm* right before it sends what may
        freeze (before that, nothing of ours needs thawing, whatever happens). Raises AgentError
        (``maybe_frozen`` says whether a thaw is still needed)."""

    def thaw(self) -> int:
        """Thaw them; return how many were thawed. Raises AgentError."""

    def reset(self) -> None:
        """Drop any connection, so the next call starts afresh (after a failed thaw)."""

    def guard_args(self) -> list[str] | None:
        """Arguments of ``python -m fleece.exporter.agent guard`` that reach this guest, or None."""


# -- the wire protocol -------------------------------------------------------------------------------------


class GuestAgent:
    """One connection to qemu-guest-agent's chardev socket (QEMU's ``-chardev socket,server=on``).

    QEMU serves one client at a time on a chardev: a second one connects but is not read from, so it
    times out like an agent that is not running. Each call has its own deadline (*timeout* seconds).
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            hint = {FileNotFoundError: "no such socket", ConnectionRefusedError: "nothing listens on it",
                    BlockingIOError: "busy: another client holds the agent's channel"}
            why = next((v for k, v in hint.items() if isinstance(e, k)), e.strerror or str(e))
            raise AgentError(f"cannot reach the guest agent on {path} ({why}): pass the host end of the agent's "
                             "chardev as --qga", stage="connect", object=path, maybe_frozen=False) from None

    def close(self) -> None:
        self._sock.close()

    def _send(self, data: bytes, stage: str) -> None:
        self._sock.settimeout(self.timeout)  # not what the last receive left of its deadline
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise self._lost(stage, e.strerror or str(e)) from None

    def _lost(self, stage: str, why: str) -> AgentError:
        return AgentError(f"the guest agent on {self.path} failed during {stage}: {why}", stage=stage,
                          object=self.path)

    def _recv(self, deadline: float, stage: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError(f"the guest agent on {self.path} did not answer {stage} within {self.timeout:g} s "
                             "(is qemu-guest-agent running in the guest?)", stage=stage, object=self.path)
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            data = None
        except OSError as e:
            raise self._lost(stage, e.strerror or str(e)) from None
        if data is None:
            self._recv(deadline, stage)  # raises the timeout above
        elif not data:
            raise self._lost(stage, "the connection was closed")
        else:
            self._buf += data
            if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
                raise self._lost(stage, f"more than {MAX_LINE} bytes without a line end: not the agent talking")

    def _line(self, deadline: float, stage: str) -> bytes:
        while b"\n" not in self._buf:
            self._recv(deadline, stage)
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def sync(self) -> None:
        """Reset the agent's parser and drop every stale answer before ours (see the module docstring)."""
        token = random.randrange(1, 2**31)
        deadline = time.monotonic() + self.timeout
        self._send(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
                   + b"\n", "sync")
        while True:
            while b"\xff" not in self._buf:
                self._buf = b""
                self._recv(deadline, "sync")
            self._buf = self._buf[self._buf.index(b"\xff") + 1:]
            if _decode(self._line(deadline, "sync")).get("return") == token:
                return

    def call(self, command: str, stage: str) -> Any:
        """``command`` (no arguments); its ``return``. An ``error`` answer: AgentError with
        ``maybe_frozen=False`` (the agent did the command's own rollback)."""
        deadline = time.monotonic() + self.timeout
        self._send(json.dumps({"execute": command}).encode() + b"\n", stage)
        while True:
            doc = _decode(self._line(deadline, stage))
            if "error" in doc:
                err = doc["error"] if isinstance(doc["error"], dict) else {}
                raise AgentError(f"the guest agent on {self.path} refused {command}: "
                                 f"{err.get('desc') or err.get('class') or doc['error']}", stage=stage,
                                 object=self.path, maybe_frozen=False)
            if "return" in doc:
                return doc["return"]


def _decode(line: bytes) -> dict[str, Any]:
    """One line of the channel as a JSON object; anything else (noise a guest wrote to the port, a cut
    answer) as an empty one, which no caller takes for an answer."""
    try:
        doc = json.loads(line.strip(b"\xff \r\t"))
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


class QgaFreezer:
    """The agent on a chardev socket fleece reaches directly (``--qga SOCK``, QEMU without libvirt)."""

    def __init__(self, path: str, timeout: float, qmp: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.qmp = qmp  # the VM's QMP socket: the guard resumes a guest a killed run left paused through it
        self.what = f"the guest agent on {path}"
        self._agent: GuestAgent | None = None

    def _connected(self) -> GuestAgent:
        if self._agent is None:
            self._agent = GuestAgent(self.path, self.timeout)
        self._agent.sync()
        return self._agent

    def freeze(self, arm: Callable[[], None]) -> int:
        try:
            agent = self._connected()
            status = agent.call("guest-fsfreeze-status", "status")
        except AgentError as e:
            e.maybe_frozen = False  # nothing that freezes was sent yet
            raise
        if status == "frozen":
            raise AgentError(f"the guest's filesystems are already frozen (not by this backup, which leaves "
                             f"them so); thaw them with guest-fsfreeze-thaw on {self.path} when whoever froze "
                             "them is done", stage="status", object=self.path, maybe_frozen=False)
        arm()
        return _count(agent.call("guest-fsfreeze-freeze", "freeze"), "freeze", self.path)

    def thaw(self) -> int:
        return _count(self._connected().call("guest-fsfreeze-thaw", "thaw"), "thaw", self.path)

    def reset(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def guard_args(self) -> list[str] | None:
        # absolute: the guard runs from / (a relative --qmp/--qga given to fleece would point nowhere)
        return ["--qga", os.path.abspath(self.path), "--timeout", str(self.timeout),
                *(["--qmp", os.path.abspath(self.qmp)] if self.qmp else [])]


def _count(ret: Any, stage: str, path: str) -> int:
    """The agent's filesystem count (freeze, thaw); anything else is an answer we cannot trust."""
    if isinstance(ret, int) and not isinstance(ret, bool):
        return ret
    raise AgentError(f"the guest agent on {path} answered {stage} with {ret!r}, not a count", stage=stage,
                     object=path)


# -- the freeze --------------------------------------------------------------------------------------------


@dataclass
class Quiesce:
    """How ``--quiesce`` went, for the manifest's ``extra.quiesce`` (filled in as the freeze proceeds)."""

    consistency: str = "crash"  # "quiesced" once the agent froze at least one filesystem
    reason: str | None = None  # why the point is only crash-consistent
    filesystems: int | None = None  # how many the agent froze
    freeze_ms: float | None = None  # how long the freeze took (hooks, flushes)
    frozen_ms: float | None = None  # how long the filesystems stayed frozen (freeze answered → thawed)
    thawed: bool | None = None  # False: every thaw attempt failed (the log says what to do)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@contextlib.contextmanager
def quiesced(freezer: Freezer | None, why_not: str | None = None) -> Iterator[Quiesce]:
    """Freeze through *freezer* for the ``with`` body, thaw after, whatever happens; yield the
    :class:`Quiesce` record. *freezer* None: no freeze possible, the point is crash-consistent *why_not*.

    Who thaws: this process, if the freezer armed (sent what may freeze) and the freeze did not certainly
    fail; the guard, if this process dies first or cannot thaw (a freeze answered after every thaw attempt
    timed out, an interrupt during the thaw). Nobody, if nothing of ours was sent: someone else's freeze
    stays.
    """
    q = Quiesce()
    if freezer is None:
        q.reason = why_not or "no guest agent"
        log.warning("--quiesce: %s; this point is crash-consistent", q.reason)
        yield q
        return
    guard = ThawGuard.start(freezer)  # before the freeze: a Python start-up must not lengthen it
    must_thaw = False
    frozen_at = None

    def arm() -> None:
        nonlocal must_thaw
        must_thaw = True
        if guard is not None:
            guard.arm()

    thawed = False
    try:
        t0 = time.monotonic()
        try:
            q.filesystems = freezer.freeze(arm)
        except AgentError as e:
            must_thaw = must_thaw and e.maybe_frozen
            q.reason = e.message
            log.warning("--quiesce: %s; this point is crash-consistent", e.message)
            freezer.reset()  # a thaw after a lost or timed-out freeze starts on a fresh connection
        else:
            frozen_at = time.monotonic()
            q.freeze_ms = round((frozen_at - t0) * 1000, 2)
            if q.filesystems > 0:
                q.consistency = "quiesced"
                log.info("%s froze %d filesystem(s) in %.1f ms", freezer.what, q.filesystems, q.freeze_ms)
            else:
                q.reason = f"{freezer.what} found no filesystem to freeze"
                log.warning("--quiesce: %s; this point is crash-consistent", q.reason)
        yield q
    finally:
        try:
            if must_thaw:
                q.thawed = _thaw(freezer)  # the first Ctrl-C/SIGTERM may land here: then the guard thaws
                if frozen_at is not None:
                    q.frozen_ms = round((time.monotonic() - frozen_at) * 1000, 2)
            thawed = not must_thaw or bool(q.thawed)
        finally:
            with contextlib.suppress(Exception):
                freezer.reset()
            if guard is not None:
                if thawed:
                    guard.disarm()
                else:
                    guard.hand_over()


def _thaw(freezer: Freezer, patience: float | None = None) -> bool:
    """Thaw, retrying on a fresh connection (:data:`THAW_ATTEMPTS` times, or for *patience* seconds);
    False (and an ERROR in the log) if every attempt failed."""
    deadline = None if patience is None else time.monotonic() + patience
    attempt = 0
    while True:
        attempt += 1
        try:
            n = freezer.thaw()
            log.debug("%s thawed %d filesystem(s)", freezer.what, n)
            return True
        except Exception as e:  # noqa: BLE001 - AgentError, or a libvirt/OS failure no layer classified
            log.warning("thaw attempt %d failed: %s", attempt, getattr(e, "message", None) or e)
            with contextlib.suppress(Exception):
                freezer.reset()
        if (attempt >= THAW_ATTEMPTS) if deadline is None else (time.monotonic() >= deadline):
            break
        time.sleep(THAW_RETRY_PAUSE)
    log.error("%s did not thaw the guest's filesystems: the guest may be frozen; thaw it with "
              "guest-fsfreeze-thaw (virsh domfsthaw for a libvirt domain) now", freezer.what)
    return False


# -- the guard against a killed run ------------------------------------------------------------------------


#: what of our environment a guard drops: the repository's credentials (it needs none), which /proc/PID/environ
#: would show for as long as it lives. The rest stays: libvirt and ssh need XDG_RUNTIME_DIR, SSH_AUTH_SOCK,
#: KRB5CCNAME… to reach a session daemon or a remote host
GUARD_DROPPED_PREFIXES = ("FLEECE_", "AWS_")


def _guard_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(GUARD_DROPPED_PREFIXES)}


class GuardLaunch:
    """A guard process (:class:`ThawGuard`) on its way up: spawned now, awaited by :meth:`ready`. A run
    spawns it early and awaits it just before it is needed, so its Python start-up overlaps the run's set-up.

    Under systemd (a ``fleece@`` service) the guard goes into a transient scope of its own
    (``systemd-run --scope``): when the service's main process is gone, systemd kills what is left in
    its cgroup, the guard included, exactly when it is needed. Where that fails, it runs as our child.
    """

    def __init__(self, args: list[str]) -> None:
        from .lock import held_fds

        self._fds = held_fds()  # the VM stays locked while a guard may still act on it
        self._argv = [sys.executable, "-P", "-m", "fleece.exporter.guard", *args,
                      *[a for fd in self._fds for a in ("--lock-fd", str(fd))]]
        scoped = os.environ.get("INVOCATION_ID") and os.geteuid() == 0 and shutil.which("systemd-run")
        self._wrappers: list[list[str]] = ([["systemd-run", "--scope", "--quiet", "--collect",
                                             f"--unit=fleece-thaw-guard-{os.getpid()}-{random.randrange(1 << 30)}",
                                             "--description=fleece: thaws or resumes the guest if its backup dies "
                                             "while it is frozen or paused", "--"]] if scoped else []) + [[]]
        self._guard: ThawGuard | None = None
        self._proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        while self._wrappers:
            wrapper = self._wrappers.pop(0)
            try:
                proc = subprocess.Popen([*wrapper, *self._argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
                                        pass_fds=self._fds, env=_guard_env())
            except OSError as e:
                log.warning("cannot start the guard (%s)", e.strerror)
                continue
            return proc
        return None

    def ready(self) -> ThawGuard | None:
        """Wait until the guard says ``ready``; the guard, or None (logged) if none would start."""
        while self._proc is not None:
            proc, wrapped = self._proc, len(self._wrappers) > 0
            assert proc.stdout is not None
            ok = select.select([proc.stdout], [], [], 30)[0] and proc.stdout.readline() == b"ready\n"
            proc.stdout.close()  # the guard never writes again
            if ok:
                self._proc = None  # the guard's now: cancel() must not close its pipe (an armed EOF)
                self._guard = ThawGuard(proc)
                return self._guard
            proc.kill()
            proc.wait()
            log.warning("the guard did not start%s", " in a systemd scope; trying without" if wrapped else "")
            self._proc = self._spawn()
        log.warning("no guard: a run killed while the guest is frozen or paused would leave it so")
        return None

    def cancel(self) -> None:
        """The run is over: tell a guard that was never armed, or was released, that it is not needed and
        wait for it (it is up and exits at once; it holds the VM's lock until then); one armed and handed
        over (no ``done``) is left to do its work. One never awaited (the run failed before its pause) is
        not waited for: it exits when its start-up is done."""
        guard, self._guard = self._guard, None
        if guard is not None and (guard.released or not guard.armed):
            if not guard.released:
                guard.release()
            guard.reap()
        proc, self._proc = self._proc, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    f.close()  # type: ignore[union-attr]
            proc.poll()


class ThawGuard:
    """A child process that thaws the guest if this process dies (or gives up) while it may be frozen, and
    resumes it if it dies inside the freeze's pause (a *pause guard*, ``--qmp`` only, guards just that).

    SIGKILL and the OOM killer run no ``finally``. The guard is started before the freeze (a Python
    start-up is ~100 ms, too long to add to the frozen window), in its own session (a Ctrl-C to the
    terminal's process group is ours to handle, not its), from ``/`` with ``-P`` (no module of the
    current directory can stand in for fleece's), and blocks reading a pipe from us:

    * ``arm``: we are about to send what may freeze; from now on end-of-file means "thaw";
    * ``done``: thawed (or nothing to thaw): it exits;
    * end-of-file after ``arm`` without ``done``: we died or gave up (:meth:`hand_over`). It first resumes a
      guest a killed run left paused under its marker (pause.py; a paused guest's agent cannot answer),
      then thaws with retries for :data:`GUARD_PATIENCE` seconds.

    It connects only after we are gone, so it never competes with us for the agent's single-client
    channel; it reports to syslog, never to our stdout/stderr (a caller reading those would wait for it).
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.armed = False  # said "arm": from now on an end-of-file without "done" makes it act
        self.released = False  # said "done": its exit is expected and may be waited for

    @classmethod
    def start(cls, freezer: Freezer) -> ThawGuard | None:
        """Start the guard and wait until it runs (it says ``ready``: ~0.1 s, before the freeze)."""
        args = freezer.guard_args()
        return None if args is None else GuardLaunch(args).ready()

    def _say(self, word: bytes) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(word + b"\n")
            self.proc.stdin.flush()

    def arm(self) -> None:
        if self.proc.poll() is not None:
            log.warning("the thaw guard exited (status %s) before the freeze: a run killed while the guest is "
                        "frozen would leave it frozen", self.proc.returncode)
        self.armed = True
        self._say(b"arm")

    def disarm(self) -> None:
        self.release()
        self.reap()

    def release(self) -> None:
        """Say ``done``: the guard exits on its own (:meth:`reap` waits for that, later, off the pause)."""
        self._say(b"done")
        self._close()
        self.released = True

    def reap(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def hand_over(self, task: str | None = None) -> None:
        """We could not thaw (or resume, *task*): the guard tries on its own (end-of-file without ``done``)."""
        self._close()
        if task is None:
            log.error("the thaw guard (pid %d) keeps trying to thaw the guest for up to %.0f s", self.proc.pid,
                      GUARD_PATIENCE)
        else:
            log.error("the guard (pid %d) tries %s through a fresh QMP connection (its outcome is in syslog)",
                      self.proc.pid, task)

    def _close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
