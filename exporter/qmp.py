"""A small synchronous facade over ``qemu.qmp``'s asyncio :class:`~qemu.qmp.QMPClient`.

The client and its event loop live on a private thread; callers get blocking methods. Keeping the loop
off the main thread matters for a backup tool: a Ctrl-C or SIGTERM in the main thread interrupts only the
*wait* for a reply, never the QMP conversation itself, so the same connection stays usable for the
teardown that must follow (unlike driving ``run_until_complete`` from the interrupted thread).

Example::

    with Monitor("/run/vm/qmp.sock") as mon:
        mon.cmd("query-status")                      # {'status': 'running', ...}
        mon.cmd("block-dirty-bitmap-add", node="disk0", name="b", persistent=True)
        mon.cmd_and_wait("block-export-del", {"id": "e", "mode": "hard"},
                         event="BLOCK_EXPORT_DELETED", match={"id": "e"})
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from fleece.repository.errors import CommandError, QemuError, QmpConnectError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The only reasons fleece decides on by QEMU's text: 7.2 reports them all as ``GenericError``, so the
#: class alone cannot tell them apart. Every match on ``desc`` lives here, next to the facade.
_REASONS: dict[str, tuple[str, ...]] = {
    "nbd-server-running": ("already running",),
    "export-missing": ("not found",),
    "node-missing": ("Failed to find node", "Cannot find"),
}


def refused_because(exc: CommandError, reason: str) -> bool:
    """Whether QEMU refused a command for *reason* (a key of ``_REASONS``)."""
    return any(phrase in exc.desc for phrase in _REASONS[reason])


def _check_socket_path(path: str) -> None:
    """Say what *path* is when it cannot be a QMP socket (a file or directory is not a "stale socket")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QmpConnectError(f"cannot connect to QMP at {path}: no such socket: check the path and that the "
                              "VM is running with -qmp unix:PATH,server=on", object=path) from None
    except OSError as exc:
        raise QmpConnectError(f"cannot use {path} as a QMP socket: {exc.strerror}", object=path) from None
    if stat.S_ISSOCK(st.st_mode):
        return
    what = ("a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode) else
            "a device file" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
            "a FIFO" if stat.S_ISFIFO(st.st_mode) else "some other kind of file")
    raise QmpConnectError(f"--qmp {path} is {what}, not a unix socket: pass the VM's QMP socket "
                          "(the PATH of -qmp unix:PATH,server=on)", object=path)


class Monitor:
    """Blocking QMP connection. One command at a time; safe to call from any single thread."""

    def __init__(self, path: str, *, timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        _check_socket_path(path)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleece-qmp", daemon=True)
        self._thread.start()
        self._client = QMPClient("fleece")
        self.version: dict[str, int] = {}
        try:
            self._run(self._connect(connect_timeout), connect_timeout + 10)
        except (FutureTimeout, asyncio.TimeoutError):
            self._stop_loop()
            raise QmpConnectError(
                f"no QMP greeting from {path} within {connect_timeout:.0f} s: it is not a QEMU QMP socket, or "
                "another client (another fleece run, libvirt) holds it — a -qmp socket serves one client at a "
                "time; give fleece a monitor of its own (-qmp unix:PATH,server=on,wait=off)") from None
        except ConnectError as exc:
            self._stop_loop()
            cause = exc.exc
            if isinstance(cause, FileNotFoundError):
                hint = "no such socket: check the path and that the VM is running with -qmp unix:PATH,server=on"
            elif isinstance(cause, ConnectionRefusedError):
                hint = "connection refused: the VM is not running (stale socket) or is not listening there"
            elif isinstance(cause, PermissionError):
                hint = "permission denied: run fleece as a user that may open the socket"
            else:
                hint = f"{exc} — is this a QEMU QMP socket?"
            raise QmpConnectError(f"cannot connect to QMP at {path}: {hint}") from None
        except QMPError as exc:
            self._stop_loop()
            raise QmpConnectError(f"{path} does not speak QMP ({exc}); pass the VM's QMP socket") from None
        greeting = self._client.greeting
        if greeting is not None:
            self.version = dict(greeting.QMP.version["qemu"])
        #: The QEMU process at the other end of the socket (``SO_PEERCRED``): what identifies "this VM"
        #: for locking, whichever of its monitors or socket paths a run came through.
        self.peer_pid: int | None = self._peer_pid()

    def _peer_pid(self) -> int | None:
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = struct.unpack("3i", creds)[0]
        return pid or None

    def peer_owner(self) -> tuple[int, int] | None:
        """The effective uid and gid QEMU runs as *now* (``/proc/PID/status``; SO_PEERCRED would give those
        of when it created the socket, before a ``-runas`` dropped them), or None if unknown."""
        if not self.peer_pid:
            return None
        try:
            with open(f"/proc/{self.peer_pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])
        except (OSError, KeyError, IndexError, ValueError):
            return None

    def process_key(self) -> str:
        """A key naming the QEMU process for as long as it lives: pid + its start time (pids get reused).

        Falls back to the socket's real path when the peer is unknown (not a unix socket, another pid
        namespace that hides it).
        """
        if self.peer_pid:
            try:
                with open(f"/proc/{self.peer_pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                return f"qemu-pid:{self.peer_pid}:{int(fields[19])}"  # field 22: starttime
            except (OSError, IndexError, ValueError):
                return f"qemu-pid:{self.peer_pid}"
        # (Not "qmp:<path>": the caller holds that lock already, and a second flock on it would refuse
        # the caller itself. Without the peer, a second run through another monitor is not detected.)
        return f"qemu-at:{os.path.realpath(self.path)}"

    # -- plumbing ---------------------------------------------------------------------------------------

    async def _connect(self, timeout: float) -> None:
        """Connect, giving up after *timeout* — inside the loop, so the library unwinds its own session.

        Cancelling the connect from another thread and stopping the loop (as a bare future timeout does)
        leaves qemu.qmp's half-open session without a loop to run its teardown in: it then logs "a bug in
        the QMP library" with two tracebacks.
        """
        try:
            await asyncio.wait_for(self._client.connect(self.path), timeout)
        except asyncio.TimeoutError:
            await self._client.disconnect()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise
        except KeyboardInterrupt:
            # Let the command finish in the background; the connection stays consistent.
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- API --------------------------------------------------------------------------------------------

    def cmd(self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None,
            **kwargs: Any) -> Any:
        """Execute *command* and return its ``return`` value; QMP errors raise :class:`CommandError`.

        Arguments with hyphens go in *args* (``{"node-name": ...}``); plain ones may be keywords.
        """
        arguments = {**(args or {}), **kwargs}
        return self._execute(self._client.execute(command, arguments or None), command, timeout,
                             "QEMU did not answer {command} within {seconds:.0f} s")

    def cmd_and_wait(self, command: str, args: Mapping[str, Any], *, event: str,
                     match: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Execute *command*, then wait for *event* whose data contains *match* (listener set up first)."""

        async def run() -> dict[str, Any]:
            with self._client.listener(event) as listener:
                await self._client.execute(command, dict(args))
                async for ev in listener:
                    data = ev.get("data", {})
                    if all(data.get(k) == v for k, v in match.items()):
                        return dict(ev)
            raise QemuError(f"event stream ended while waiting for {event}")

        return self._execute(run(), command, timeout, f"no {event} from QEMU within {{seconds:.0f}} s after {{command}}")

    def _execute(self, coro: Coroutine[Any, Any, T], command: str, timeout: float | None, timeout_message: str) -> T:
        """Run a coroutine that executes *command*, mapping every failure to fleece's QEMU errors."""
        seconds = timeout or self.timeout
        try:
            return self._run(coro, seconds)
        except ExecuteError as exc:
            raise CommandError(command, exc.error_class, str(exc)) from None
        except FutureTimeout:
            raise QemuError(timeout_message.format(command=command, seconds=seconds)) from None
        except QMPError as exc:
            raise QemuError(f"QMP connection to {self.path} failed during {command}: {exc}") from None

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (used by tests to simulate guest writes with ``qemu-io``)."""
        return str(self.cmd("human-monitor-command", {"command-line": command_line}))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.disconnect(), 5)
        except Exception as exc:  # noqa: BLE001 - closing must not mask the real error
            log.debug("QMP disconnect: %s", exc)
        self._stop_loop()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
