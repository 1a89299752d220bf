"""The guard process: thaws or resumes the guest if the backup that started it dies while it may be
frozen or paused (:class:`~fleece.exporter.agent.ThawGuard` starts it and speaks its pipe protocol).

Its own module, and light: a backup starts one for every pause (pause.py) and does not wait for it, so its
start-up runs alongside the pause on a small host. It imports only what reading its pipe needs; QMP, the
guest agent and logging are imported once it has work — after its parent died armed.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import Freezer


def _log_to_syslog() -> None:
    """The guard's messages go to syslog (the journal), where an operator looks after a crashed run."""
    import logging
    import logging.handlers

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if os.path.exists("/dev/log"):
        h: logging.Handler = logging.handlers.SysLogHandler("/dev/log")
        h.setFormatter(logging.Formatter("fleece-thaw-guard[%(process)d]: %(message)s"))
        root.addHandler(h)


def _wait_for_parent() -> bool:
    """Read the pipe until ``done`` or end-of-file; True if the guest may need us (armed, not done)."""
    data = b""
    while True:  # select first: the read must not be cut short by a signal
        select.select([sys.stdin.buffer], [], [])
        chunk = os.read(sys.stdin.fileno(), 64)
        if not chunk:
            return b"arm" in data
        data += chunk
        if b"done" in data:
            return False


def _resume_paused(qmp: str, timeout: float) -> None:
    """Resume a guest that a dead run left paused under its marker (pause.recover), so its agent can
    answer the thaw; a guest paused otherwise is left as it is."""
    from .pause import recover
    from .qmp import Monitor

    import logging

    log = logging.getLogger(__name__)
    try:
        mon = Monitor(qmp, timeout=timeout, connect_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - another client holds the monitor, QEMU is gone: thaw anyway
        log.info("cannot reach %s to resume a paused guest: %s", qmp, e)
        return
    try:
        for line in recover(mon):
            log.warning("%s", line)
    except Exception as e:  # noqa: BLE001
        log.info("resuming through %s failed: %s", qmp, e)
    finally:
        mon.close()


def main(argv: list[str]) -> int:
    """``python -m fleece.exporter.guard (--qga SOCK [--qmp SOCK] | --qmp SOCK | --libvirt URI UUID)
    --timeout T``; ``--qmp`` alone guards only the freeze's pause (pause.py)."""
    import argparse

    p = argparse.ArgumentParser(prog="fleece.exporter.guard")
    p.add_argument("--qga")
    p.add_argument("--qmp")
    p.add_argument("--libvirt", nargs=2, metavar=("URI", "UUID"))
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--lock-fd", type=int, action="append", default=[])
    args = p.parse_args(argv)
    try:  # a parent that did not wait for it (or is gone) closed the pipe
        os.write(sys.stdout.fileno(), b"ready\n")
        os.close(sys.stdout.fileno())
    except OSError:
        pass
    if not _wait_for_parent():
        return 0
    import contextlib
    import logging

    from .agent import GUARD_PATIENCE, THAW_RETRY_PAUSE, QgaFreezer, _thaw

    log = logging.getLogger(__name__)
    _log_to_syslog()
    for fd in args.lock_fd if (args.qga or args.libvirt) else []:
        # the VM stays locked while we may still thaw (for minutes): say who holds it. A pause guard only
        # resumes, in ~0.1 s: the dead run's pid stays, and the next run waits for it (lock.py)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} (the thaw guard of a backup that died or gave up)\n".encode(), 0)
    deadline = time.monotonic() + GUARD_PATIENCE
    freezer: Freezer | None = None
    if args.libvirt:
        from .libvirt_run import LibvirtFreezer

        while freezer is None:  # libvirtd restarting, the connection refused: keep trying
            try:
                freezer = LibvirtFreezer.reach(args.libvirt[0], args.libvirt[1], args.timeout)
            except Exception as e:  # noqa: BLE001
                if time.monotonic() > deadline:
                    log.error("cannot reach domain %s on %s to thaw it: %s", args.libvirt[1], args.libvirt[0], e)
                    return 1
                time.sleep(THAW_RETRY_PAUSE)
    else:
        if args.qmp:
            _resume_paused(args.qmp, args.timeout)
        if not args.qga:  # a pause guard (no --quiesce): resuming was all there was to do
            return 0
        freezer = QgaFreezer(args.qga, args.timeout)
    ok = _thaw(freezer, max(1.0, deadline - time.monotonic()))
    if ok:
        log.warning("a backup died or gave up while %s may have kept the guest frozen: thawed it", freezer.what)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover - the guard's entry point, exercised by the SIGKILL tests
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # the run's own signals are not the guard's business
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
