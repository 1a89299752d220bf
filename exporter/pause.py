"""The freeze's pause of the guest, recorded inside QEMU so that no killed run can leave a guest paused.

A backup pauses a running guest for the few milliseconds in which its bitmaps switch and its copy-before-write
filters go in (DESIGN §5). A run SIGKILLed inside that window used to leave the VM paused for good: the next run
saw a "paused" guest, took it for one the user had paused, and left it so. The pause is therefore bracketed by
a marker object in QEMU itself::

    object-add secret fleece-pause-<point>  →  stop  →  (freeze)  →  cont  →  object-del fleece-pause-<point>

A marker that outlives its run can only mean the run died between its ``stop`` and its ``cont`` (or just
around them), and the next run — which holds the per-process lock, so no live run owns the marker — resumes a
guest it finds ``paused`` and drops the marker. A guest that is *not* plainly paused (an I/O error stop, a
shutdown, a migration) is left as it is: that state is not ours to undo. A guest the user paused before the
run is never stopped nor resumed, and no marker is made for it.

A run killed inside the pause should not have to wait for the next run, which may be a day away: a *pause
guard* (:class:`~fleece.exporter.agent.GuardLaunch` with ``--qmp`` only), spawned early in the run so its
~0.07 s Python start-up overlaps the run's set-up, is armed for exactly the pause and, when its parent dies
armed, connects to the monitor and runs :func:`recover` — the guest runs again within a fraction of a second.
The marker stays the backstop for a guard killed along with its run.

The marker lives in QEMU, not in a file, because it must be found through any monitor of that QEMU, by a run
of any user, after any crash of the host's tools; a ``secret`` object is inert (nothing reads it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .bitmaps import PREFIX
from .qmp import CommandError, Monitor

if TYPE_CHECKING:
    from .agent import ThawGuard

log = logging.getLogger(__name__)

MARK = f"{PREFIX}pause-"


@contextlib.contextmanager
def paused(mon: Monitor, point_id: str, running: bool, guard: ThawGuard | None = None) -> Iterator[None]:
    """Keep the guest paused for the ``with`` body if it was *running*; resume it whatever happens.

    *guard*: a ready pause guard (``GuardLaunch(["--qmp", SOCK]).ready()``), armed for exactly the
    pause: if this process is killed inside it (SIGKILL, OOM), the guard resumes the guest at once through
    the marker (:func:`recover`) instead of it staying paused until fleece next runs on this VM. It is
    released (told ``done``) after the resume, and reaped by its launcher off the pause.
    """
    if not running:
        yield
        return
    marker = MARK + point_id
    resumed = True
    try:
        if guard is not None:  # inside the try: an interrupt right after it still releases the guard
            guard.arm()
        mon.cmd("object-add", {"qom-type": "secret", "id": marker, "data": "paused by a fleece backup"})
        resumed = False
        try:
            mon.cmd("stop")
            yield
        finally:
            mon.cmd("cont")
            resumed = True
            _drop(mon, marker)  # only once resumed: a marker kept is how the guard or the next run resumes
    finally:
        if guard is not None:
            if resumed:
                guard.release()
            else:  # QEMU did not take our cont: the guard tries once more through a fresh connection
                guard.hand_over("to resume the guest")


def recover(mon: Monitor) -> list[str]:
    """Resume a guest that a killed run left paused; drop its markers. Returns lines for the log."""
    markers = [o["name"] for o in mon.cmd("qom-list", {"path": "/objects"}) if o["name"].startswith(MARK)]
    if not markers:
        return []
    points = ", ".join(m[len(MARK):] for m in markers)
    status = mon.cmd("query-status")["status"]
    lines = []
    if status == "paused":
        mon.cmd("cont")  # first: the guest runs again before anything else is done
        lines.append(f"resumed the guest: an interrupted backup (point {points}) was killed while it had the "
                     "guest paused for its freeze")
    elif status != "running":
        lines.append(f"an interrupted backup (point {points}) had paused the guest; it is now '{status}', "
                     "which fleece leaves alone (resume it yourself once that is dealt with)")
    for m in markers:
        _drop(mon, m)
    return lines


def _drop(mon: Monitor, marker: str) -> None:
    try:
        mon.cmd("object-del", {"id": marker})
    except CommandError as exc:  # already gone: the next run finds nothing, which is all that matters
        log.debug("marker %s: %s", marker, exc)
