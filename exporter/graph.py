"""The fleece: a frozen, exportable point-in-time view of each disk, and its removal.

Per disk (FIELD-NOTES §5b, verified on QEMU 7.2)::

    scratch qcow2 (discard: unmap) ◄── copy-before-write ──► disk node      device ─► cbw   (qom-set)
                                        ▲                                     snapshot-access ─► NBD export
                                        └── on-cbw-error: break-snapshot, cbw-timeout

``break-snapshot`` is the reason for this scheme: when the scratch area fills up or stalls, the *backup*
fails (reads of the snapshot return errors) and the guest's write succeeds. The classic scheme and cbw's
default would fail the guest's write instead.

Every node, export and scratch file carries the ``fleece-`` prefix so that a run killed half-way can be
recognised and unwound by the next one (:func:`unwind`), before it does anything else.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleece.repository import rundir
from fleece.repository.errors import QemuError
from .bitmaps import PREFIX, disk_token
from .inventory import DiskInfo, qom_path
from .qmp import CommandError, Monitor, refused_because

log = logging.getLogger(__name__)

CBW_TIMEOUT = 30  # seconds a guest write may wait for its copy-before-write before the snapshot breaks


@dataclass(frozen=True)
class FleeceNames:
    """Names of one disk's fleece objects; node names must stay under 32 characters."""

    token: str

    @classmethod
    def for_disk(cls, disk_id: str) -> FleeceNames:
        return cls(disk_token(disk_id))  # the token the disk's bitmap names carry too

    @property
    def target(self) -> str:
        return f"{PREFIX}tgt-{self.token}"

    @property
    def cbw(self) -> str:
        return f"{PREFIX}cbw-{self.token}"

    @property
    def snap(self) -> str:
        return f"{PREFIX}snap-{self.token}"

    @property
    def export(self) -> str:
        """The frozen view (snapshot-access) with the frozen bitmap."""
        return f"{PREFIX}{self.token}"

    @property
    def live_export(self) -> str:
        """The live disk node, for ``base:allocation`` over its whole backing chain (plan only)."""
        return f"{PREFIX}{self.token}-live"

    @property
    def target_export(self) -> str:
        """The fleece target, whose data marks what the guest overwrote since the freeze (plan only)."""
        return f"{PREFIX}{self.token}-tgt"

    def all(self) -> set[str]:
        return {self.target, self.cbw, self.snap, self.export, self.live_export, self.target_export}


@dataclass
class DiskFleece:
    """One disk's live fleece."""

    disk: DiskInfo
    names: FleeceNames
    scratch_file: Path
    inserted: bool = False  # device switched to the cbw filter
    exported: bool = False




def make_run_dir(scratch: Path) -> Path:
    """A private (0700) directory for this run's NBD socket and fleece targets, under *scratch*
    (``/var/tmp`` is world-writable: see :mod:`fleece.repository.rundir`)."""
    return rundir.make_run_dir(scratch, f"{PREFIX}run-")


def create_scratch(path: Path, size: int) -> None:
    """The CBW target: a thin qcow2 holding only the old data of blocks the guest overwrites.

    It holds guest data, so it is 0600 from the moment it exists: created here with ``O_EXCL |
    O_NOFOLLOW`` (a name that exists fails instead of being followed), then formatted by ``qemu-img
    create``, which keeps an existing file's mode — a file it made itself would be 0644 minus the umask.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise QemuError(f"cannot create the fleece scratch image {path}: {exc.strerror or exc} "
                        "(check --scratch: it must be a writable local directory)", object=str(path)) from None
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise QemuError(f"cannot create the fleece scratch image {path}: {exc.stderr.strip()} "
                        "(check --scratch: it must be a writable local directory)") from None
    except FileNotFoundError:
        raise QemuError("qemu-img not found: install qemu-utils (tools/setup does)") from None


def add_target(mon: Monitor, f: DiskFleece) -> None:
    mon.cmd("blockdev-add", {"driver": "qcow2", "node-name": f.names.target, "discard": "unmap",
                             "file": {"driver": "file", "filename": str(f.scratch_file), "discard": "unmap"}})


def add_cbw(mon: Monitor, f: DiskFleece) -> None:
    # discard=unmap: without it the filter swallows the guest's discards for as long as the fleece is in
    # place (FIELD-NOTES §5e); with it cbw copies the old data first, then lets the discard through.
    mon.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": f.names.cbw, "file": f.disk.node,
                             "target": f.names.target, "on-cbw-error": "break-snapshot",
                             "cbw-timeout": CBW_TIMEOUT, "discard": "unmap"})


def insert_cbw(mon: Monitor, f: DiskFleece) -> None:
    """The point in time: from now on every guest write passes through the filter.

    ``qom-set … drive`` on a realized device swaps the root of its BlockBackend (``blk_replace_bs``); it
    works on every bus that has a ``drive`` property on the device owning the BlockBackend: virtio-blk's
    ``virtio-backend``, scsi-hd, ide-hd, nvme, nvme-ns and usb-storage's internal scsi-hd (verified on 7.2).
    The path is the absolute one from :func:`~exporter.inventory.qom_path`: a bare id is ambiguous for NVMe.
    """
    mon.cmd("qom-set", {"path": f.disk.qom_path, "property": "drive", "value": f.names.cbw})
    f.inserted = True


def add_snapshot(mon: Monitor, f: DiskFleece) -> None:
    mon.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": f.names.snap, "file": f.names.cbw})


def start_nbd_server(mon: Monitor, socket_path: str) -> None:
    """Start QEMU's NBD server on a private unix socket (7.2 wants the legacy address form)."""
    addr = {"type": "unix", "data": {"path": socket_path}}
    try:
        mon.cmd("nbd-server-start", {"addr": addr})
    except CommandError as exc:
        if not refused_because(exc, "nbd-server-running"):
            raise
        others = [e["id"] for e in mon.cmd("query-block-exports") if not e["id"].startswith(PREFIX)]
        if others:
            raise QemuError(f"this VM already runs an NBD server with exports {others} (another tool?); "
                            "QEMU allows one NBD server per VM: stop it or run fleece when it is idle") from None
        # A server with no foreign exports is what a killed fleece run leaves: take it over.
        log.info("restarting a leftover NBD server of an earlier fleece run")
        mon.cmd("nbd-server-stop")
        mon.cmd("nbd-server-start", {"addr": addr})


def export(mon: Monitor, f: DiskFleece, bitmap: str | None) -> None:
    args: dict[str, Any] = {"type": "nbd", "id": f.names.export, "node-name": f.names.snap,
                            "name": f.names.export, "writable": False}
    if bitmap is not None:
        # Through snapshot-access the bitmap must be named with its node (7.1+ form).
        args["bitmaps"] = [{"node": f.disk.node, "name": bitmap}]
    mon.cmd("block-export-add", args)
    f.exported = True


def export_plan_sources(mon: Monitor, f: DiskFleece) -> None:
    """Read-only exports of the live disk node and of the fleece target, for the plan (see plan.py).

    Both are metadata sources only: nothing reads data from them. QEMU accepts a read-only export of a
    node that a device writes through a filter, and of the target while the filter writes to it.
    """
    for export_id, node in ((f.names.live_export, f.disk.node), (f.names.target_export, f.names.target)):
        mon.cmd("block-export-add", {"type": "nbd", "id": export_id, "node-name": node, "name": export_id,
                                     "writable": False})


# -- teardown and recovery ------------------------------------------------------------------------------

def _graph(mon: Monitor) -> tuple[dict[int, str], list[dict[str, Any]]]:
    g = mon.cmd("x-debug-query-block-graph")
    return {n["id"]: n["name"] for n in g["nodes"]}, g["edges"]


def _file_child(mon: Monitor, node: str) -> str | None:
    names, edges = _graph(mon)
    ids = {v: k for k, v in names.items()}
    for e in edges:
        if e["parent"] == ids.get(node) and e["name"] == "file":
            return names[e["child"]]
    return None


def _del_export(mon: Monitor, export_id: str) -> None:
    try:
        mon.cmd_and_wait("block-export-del", {"id": export_id, "mode": "hard"}, event="BLOCK_EXPORT_DELETED",
                         match={"id": export_id}, timeout=30)
    except CommandError as exc:
        if not refused_because(exc, "export-missing"):
            raise


def _del_node(mon: Monitor, node: str) -> None:
    try:
        mon.cmd("blockdev-del", {"node-name": node})
    except CommandError as exc:
        if not refused_because(exc, "node-missing"):
            raise


def unwind(mon: Monitor, only: set[str] | None = None, stop_server: bool = True) -> list[str]:
    """Remove fleece exports, nodes and filters (all of them, or those whose names are in *only*).

    Order matters and mirrors setup: export → NBD server → snapshot-access → device back on its node →
    cbw filter → scratch target (and its file). Returns what was removed, for the log.
    """
    removed: list[str] = []

    def wanted(name: str) -> bool:
        return name.startswith(PREFIX) and (only is None or name in only)

    for e in mon.cmd("query-block-exports"):
        if wanted(e["id"]):
            _del_export(mon, e["id"])
            removed.append(f"export {e['id']}")
    if stop_server and not mon.cmd("query-block-exports"):
        try:
            mon.cmd("nbd-server-stop")
        except CommandError:
            pass  # no server running: nothing to stop

    nodes = {n["node-name"]: n for n in mon.cmd("query-named-block-nodes", {"flat": True})}
    for name in [n for n in nodes if wanted(n) and n.startswith(f"{PREFIX}snap-")]:
        _del_node(mon, name)
        removed.append(f"node {name}")
    for name in [n for n in nodes if wanted(n) and n.startswith(f"{PREFIX}cbw-")]:
        original = _file_child(mon, name)
        for dev in mon.cmd("query-block"):
            if (dev.get("inserted") or {}).get("node-name") == name and original:
                mon.cmd("qom-set", {"path": qom_path(dev["qdev"]), "property": "drive", "value": original})
                removed.append(f"filter on {dev['qdev']}")
        _del_node(mon, name)
        removed.append(f"node {name}")
    for name in [n for n in nodes if wanted(n) and n.startswith(f"{PREFIX}tgt-")]:
        filename = nodes[name].get("file", "")
        _del_node(mon, name)
        removed.append(f"node {name}")
        if filename and os.path.basename(filename).startswith(PREFIX):
            Path(filename).unlink(missing_ok=True)
    return removed
