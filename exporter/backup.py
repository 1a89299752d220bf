"""One backup run: recover → choose levels → freeze → export → plan → pull → commit (DESIGN §5, §6).

The order of the last steps is the commit protocol:

1. every disk's frozen view is read and handed to the writer; the fleece is torn down at once (the guest
   stops paying for copy-before-write as soon as possible);
2. the writer flushes: packs durable, then the run's index;
3. the manifest is written with put-if-absent — the commit point;
4. only then the parent's bitmaps are dropped.

Any failure before 3 — an exception, Ctrl-C, SIGTERM — tears the fleece down and folds every new bitmap
back into its old one, so the next run's incremental is exact. A run killed with SIGKILL leaves that work
to the next run, which starts by unwinding whatever ``fleece-`` objects it finds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from fleece import __version__
from fleece.repository import Repository
from fleece.repository.errors import UsageError
from fleece.repository.merge import MAX_CHAIN, MAX_HINTS, merged_record
from fleece.repository.manifest import (KIND_FULL, KIND_INCREMENTAL, DiskRecord, Extent, Manifest, annotation_fields,
                                       check_vm_name, new_point_id)

from . import bitmaps, graph, handover, pause
from fleece.repository.errors import ExportReadError, QemuError, RepositoryError
from .audit import DEFAULT_SAMPLE, AuditReport, audit, choose_sample
from .identity import Machine, check_history
from .images import ImageSpec
from .images import resolve as resolve_images
from .inventory import DiskInfo, VmInfo, inspect, inspect_images
from .lock import VmLock
from .plan import ALLOCATION, DiskPlan, Job, PlanSources, plan_full, plan_incremental
from .pull import BufferPool, Puller
from .qmp import Monitor
from .storage_daemon import StorageDaemon

log = logging.getLogger(__name__)

TOOL = f"fleece {__version__}"
#: More parallel NBD connections than this only queue inside QEMU's one I/O thread per disk.
MAX_WORKERS = 64

#: ``event(name, data)``, in run order: with --quiesce "quiesced" (the agent's freeze answered or failed:
#: the data is the ``Quiesce`` record so far; nothing else has changed yet), "freezing" (a running guest
#: is paused, its bitmaps not yet switched: keep the hook quick), "frozen" (the point in time is fixed,
#: the guest runs again, nothing exported yet), "exported" (every NBD export is up, nothing planned; "disks": the ids to read), per disk "planning" (its
#: live status is read, the fleece target not yet) and "disk" (planned, about to be read: planned sizes;
#: "job_bytes" = what its blobs and zero ranges cover, the unit of ``on_committed``), "pulled" (every disk
#: read, fleece still in place), "flushing" (fleece gone, the last packs and the index about to be
#: uploaded), "committing" (all durable, manifest about to be written), "committed" (manifest written,
#: old bitmaps not yet dropped). Used for progress output and by tests to act at exact moments of a run.
EventHook = Callable[[str, dict[str, Any]], None]


@dataclass
class BackupRequest:
    qmp: str | None = None  # a running VM's QMP socket; or:
    images: list[ImageSpec] | None = None  # a shut-off VM's images (``--image [ID=]PATH``; images.py); or:
    image_format: str | None = None  # ``--image-format``: every image's format (None: probed, guarded)
    libvirt: str | None = None  # a libvirt domain's name or UUID (``--libvirt``; libvirt_run.py)
    connect: str | None = None  # the libvirt URI (``--connect``; None: libvirt's default)
    quiesce: bool = False  # freeze the guest's filesystems through its agent around the point in time
    qga: str | None = None  # the host end of the guest agent's chardev (``--qga``; QEMU direct only)
    quiesce_timeout: float = 30.0  # seconds an agent call may take before the point falls back to crash
    vm: str | None = None
    disks: list[str] | None = None
    full: bool | list[str] = False  # True: every disk full (``--full``); a list: those disk ids (``--full ID``)
    workers: int = 4
    scratch: str | None = None
    audit_sample: int = DEFAULT_SAMPLE  # clean blobs re-read per incremental disk to check the bitmap (0 = off)
    adopt: bool = False  # continue the history of a VM name recorded from another machine (identity.py)
    tags: list[str] = field(default_factory=list)  # the point's tags (``forget --keep-tag``)
    note: str | None = None  # a free text the point carries (``fleece list``)
    on_event: EventHook | None = None
    progress: Callable[[int], None] | None = None  # bytes read from the frozen view (job lengths)
    # (raw, stored) bytes as they become durable: packs uploaded, duplicates found, zero ranges recorded
    on_committed: Callable[[int, int], None] | None = None


@dataclass
class BackupResult:
    manifest: Manifest
    stats: dict[str, Any] = field(default_factory=dict)


def run_backup(repo: Repository, req: BackupRequest) -> BackupResult:
    """Back up every selected disk of the VM behind ``req.qmp`` to one point in time in *repo*.

    One fleece per QEMU process at a time: the lock is keyed on the process behind the socket (not the
    socket path, not the VM name), so a second run through another monitor of the same QEMU is refused
    instead of "cleaning up" the first run's live fleece, and two different VMs that share a name never
    block each other. Only the holder of that lock unwinds ``fleece-`` leftovers in that QEMU.
    """
    if not 1 <= req.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}")
    if req.vm is not None:
        check_vm_name(req.vm)  # before any work: a name the repository cannot store fails now, not at commit
    given = [opt for opt, v in (("--qmp", req.qmp is not None), ("--image", bool(req.images)),
                                ("--libvirt", req.libvirt is not None)) if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other: --qmp backs up a running VM through its "
                         "QMP socket, --libvirt a libvirt domain, --image the images of a shut-off VM")
    if req.image_format is not None and not req.images:
        raise UsageError("--image-format only goes with --image PATH")
    if req.connect is not None and req.libvirt is None:
        raise UsageError("--connect URI only goes with --libvirt DOMAIN (or --all)")
    _check_quiesce(req)
    if req.libvirt is not None:
        from .libvirt_run import backup_domain  # python3-libvirt only where libvirt is used

        return backup_domain(repo, req, _scratch_dir(req))
    if req.images:
        return _backup_images(repo, req, _scratch_dir(req))
    if req.qmp is None:
        raise UsageError("say which VM: --qmp SOCK for a running one (the PATH of its -qmp unix:PATH,server=on), "
                         "--libvirt DOMAIN for a libvirt domain, --image PATH for each disk image of a shut-off one")
    if not req.qmp:
        raise UsageError("--qmp is empty: pass the VM's QMP socket (the PATH of -qmp unix:PATH,server=on)")
    scratch = _scratch_dir(req)
    # The socket's lock first: a second run through the same socket is told at once, instead of waiting
    # for a greeting QEMU gives one client at a time.
    with interrupt_once(), VmLock(f"qmp:{os.path.realpath(req.qmp)}", f"the VM behind {req.qmp}"):
        mon = Monitor(req.qmp)
        try:
            with VmLock(mon.process_key(), f"the QEMU process behind {req.qmp} (pid {mon.peer_pid or '?'})"):
                return _Run(repo, req, mon, scratch).run()
        finally:
            mon.close()


def _check_quiesce(req: BackupRequest) -> None:
    if req.qga is not None and not req.quiesce:
        raise UsageError("--qga SOCK is the guest agent --quiesce uses: add --quiesce (or leave --qga out)")
    if not req.quiesce:
        return
    if not req.quiesce_timeout > 0:
        raise UsageError("--quiesce-timeout must be a positive number of seconds")
    if req.images:
        raise UsageError("--quiesce freezes a running guest's filesystems; a shut-off VM (--image) has none "
                         "mounted: leave --quiesce out")
    if req.libvirt is not None:
        if req.qga is not None:
            raise UsageError("--qga is for a VM fleece reaches over --qmp; libvirt talks to its domains' agents "
                             "itself: leave --qga out")
    elif not req.qga:
        raise UsageError("--quiesce needs --qga SOCK: the host end of the guest agent's channel (-chardev "
                         "socket,path=SOCK,server=on,wait=off,id=qga0 -device virtserialport,chardev=qga0,"
                         "name=org.qemu.guest_agent.0)")


def _backup_images(repo: Repository, req: BackupRequest, scratch: Path) -> BackupResult:
    """A shut-off VM: its images opened in a qemu-storage-daemon of this run's own (storage_daemon.py).

    Locks are taken per image (real path), so a second fleece run on the same image is told so by name
    before the daemon's image lock would refuse it with QEMU's words.
    """
    assert req.images
    vm, images = resolve_images(repo, req.images, req.vm, req.image_format)
    with interrupt_once(), contextlib.ExitStack() as stack:
        for image in sorted(images, key=lambda i: i.path):
            stack.enter_context(VmLock(f"image:{image.path}", f"image {image.path}"))
        daemon = stack.enter_context(StorageDaemon(images, scratch))
        mon = Monitor(daemon.qmp_path)
        stack.callback(mon.close)  # before the daemon stops (the stack unwinds in reverse)
        nodes = daemon.open(mon)
        run = _Run(repo, dataclasses.replace(req, vm=vm), mon, scratch,
                   inventory=lambda: inspect_images(mon, nodes))
        return run.run()


def _scratch_dir(req: BackupRequest) -> Path:
    """The directory for the run's fleece targets, checked before any work.

    Absolute, because QEMU opens the targets from its own working directory, not ours.
    """
    scratch = Path(req.scratch or os.environ.get("FLEECE_SCRATCH", "/var/tmp")).absolute()
    if not scratch.is_dir():
        raise UsageError(f"scratch directory {scratch} does not exist; pass --scratch DIR", object=str(scratch))
    if not os.access(scratch, os.W_OK | os.X_OK):
        raise UsageError(f"scratch directory {scratch} is not writable (read-only filesystem or permissions); "
                         "pass --scratch DIR on a writable local filesystem", object=str(scratch))
    return scratch


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Let the first SIGINT/SIGTERM interrupt the run, and only the first (main thread only).

    A user who hammers Ctrl-C must not interrupt the rollback that the first one started: the graph
    teardown and the bitmap fold-back have to finish, or a fleece stays in the VM. Any window between
    the first KeyboardInterrupt and a later "shield" would let a second one through, so the handler
    itself refuses to raise twice. Once it has fired, further signals stay ignored until the process
    exits (the run is failing already; its caller only reports).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:
            return  # the run is already unwinding
        fired.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, signal.SIG_IGN if fired else previous)


class _Run:
    def __init__(self, repo: Repository, req: BackupRequest, mon: Monitor, scratch: Path,
                 inventory: Callable[[], VmInfo] | None = None) -> None:
        self.repo = repo
        self.req = req
        self.mon = mon
        #: what the VM looks like now: a running QEMU's devices, or a shut-off VM's images (storage daemon)
        self.inventory = inventory or (lambda: inspect(mon))
        self.scratch = scratch
        self.event = req.on_event or (lambda name, data: None)
        self.prefix = bitmaps.repo_prefix(repo.config.id)
        self._adopted = False

    # -- the run ----------------------------------------------------------------------------------------

    def run(self) -> BackupResult:
        started = time.monotonic()
        info = self.inventory()
        vm = self.req.vm or info.name
        if not vm:
            raise UsageError("the VM has no name (-name); pass --vm NAME to say which name its points carry")
        self.vm = check_vm_name(vm)
        self.repo.check_not_downgraded()
        self.machine = self._machine(info)
        self._check_identity(vm)
        info = self._recover(vm, info)
        guard = self._pause_guard(info)  # now: its start-up overlaps the planning below
        try:
            return self._plan_and_back_up(vm, info, guard, started)
        finally:
            if guard is not None:
                guard.cancel()

    def _plan_and_back_up(self, vm: str, info: VmInfo, guard: Any, started: float) -> BackupResult:
        disks = self._select(info)
        forced = self._forced_full(info, disks)
        bases = self.repo.latest_layers(vm, [d.id for d in disks])
        levels = {d.id: bitmaps.choose_level(d, bases[d.id], d.id in forced) for d in disks}
        # Before QEMU is changed: a full loads the index (it dedups against every blob stored, and a damaged
        # index, or one of the other format — a replaced config — fails it here rather than after the
        # freeze); an incremental dedups against its parent chains only and reads no index at all, so its
        # fixed cost does not grow with the repository's history.
        self.known = self._known_blobs(levels)
        if self.known is None:
            self.repo.load_index()
        for d in disks:
            lv = levels[d.id]
            log.info("disk %s: %s backup (%s)", d.id, lv.kind, lv.reason)
            if lv.remove_first:
                bitmaps.transaction(self.mon, [{"type": "block-dirty-bitmap-remove",
                                                "data": {"node": d.node, "name": n}} for n in lv.remove_first])
        point_id = new_point_id()
        # One name per disk: a disk's bitmap can never be taken for another disk's (images swapped, ids
        # reassigned) — it simply is not there, and that disk gets a full.
        new_bitmaps = {d.id: bitmaps.bitmap_name(self.repo.config.id, point_id, d.id) for d in disks}
        manifest, stats = self._backup(vm, info, disks, levels, point_id, new_bitmaps, guard)
        self.event("committed", {"point": manifest.id})
        for d in disks:
            self._drop_old_bitmaps(d, new_bitmaps[d.id])
        stats["duration_s"] = round(time.monotonic() - started, 3)
        return BackupResult(manifest, stats)

    def _machine(self, info: VmInfo) -> Machine:
        return Machine.of(self.mon, info)

    def _check_identity(self, vm: str) -> None:
        ids = self.repo.point_ids(vm)
        if not ids:
            return
        last = self.repo.manifest(vm, ids[-1])
        line = check_history(vm, self.machine, Machine.from_json(last.extra.get("machine")), last.id,
                             self.req.adopt)
        if line and not self._adopted:
            log.warning("%s", line)
            self._adopted = True

    def _recover(self, vm: str, info: VmInfo) -> VmInfo:
        """Unwind what an earlier, killed run left in QEMU (we hold the lock: no live run owns it).

        A guest it left paused is resumed first: the VM runs again before anything else is tried.
        """
        if not info.offline:  # a storage daemon is this run's own: no guest, nothing left in it
            for line in pause.recover(self.mon):
                log.warning("%s", line)
            for what in graph.unwind(self.mon):
                log.warning("cleaned up after an interrupted run: removed %s", what)
        info = self.inventory()
        committed_ids: set[str] | None = None

        def committed(point_id: str) -> bool:
            nonlocal committed_ids
            if committed_ids is None:
                committed_ids = set(self.repo.point_ids(vm))
            return point_id in committed_ids

        changed = False
        for d in info.disks:
            for line in bitmaps.recover(self.mon, d, self.prefix, committed):
                log.warning("%s", line)
                changed = True
        return self.inventory() if changed else info

    def _select(self, info: VmInfo) -> list[DiskInfo]:
        by_id = {d.id: d for d in info.disks}
        if self.req.disks:
            unknown = [d for d in self.req.disks if d not in by_id]
            if unknown:
                raise UsageError(f"no disk {', '.join(unknown)} in this VM; its disks are: "
                                 f"{', '.join(by_id) or 'none'}")
            chosen = [by_id[d] for d in dict.fromkeys(self.req.disks)]
            detached = [d.id for d in chosen if not d.attached]
            if detached:
                raise UsageError(f"drive {', '.join(detached)} is not attached to any guest device: nothing in the "
                                 "VM can write it, and there is no device to put the fleece in front of; leave it out")
        else:
            chosen = []
            for d in info.disks:
                if not d.attached:
                    log.info("skipping drive %s (%s): no guest device uses it", d.id, d.filename)
                    continue
                if d.read_only:
                    log.info("skipping read-only device %s (%s)", d.id, d.filename)
                    continue
                chosen.append(d)
        if not chosen:
            raise UsageError("the VM has no writable disks to back up")
        for d in chosen:  # a raw or read-only disk is a full every time (bitmaps.choose_level says so)
            if d.node.startswith(graph.PREFIX):
                raise QemuError(f"disk {d.id} is still attached to fleece node {d.node}; "
                                "this should have been cleaned up — report a bug")
        return chosen

    def _forced_full(self, info: VmInfo, chosen: list[DiskInfo]) -> set[str]:
        """The disks ``--full`` makes full: every one (``full=True``), none, or the ids it names.

        Checked before anything is frozen, like ``--disk``: a misspelt id must not silently turn into an
        incremental of the disk the user wanted a fresh full of.
        """
        if self.req.full is True:
            return {d.id for d in chosen}
        names = list(dict.fromkeys(self.req.full or []))
        unknown = [n for n in names if n not in {d.id for d in info.disks}]
        if unknown:
            raise UsageError(f"no disk {', '.join(unknown)} in this VM (--full); its disks are: "
                             f"{', '.join(d.id for d in info.disks) or 'none'}")
        left_out = [n for n in names if n not in {d.id for d in chosen}]
        if left_out:
            why = ("name it with --disk too" if self.req.disks else
                   "read-only disks and drives without a guest device are backed up only when named with --disk")
            raise UsageError(f"--full {', '.join(left_out)}: this backup leaves that disk out; {why}")
        return set(names)

    def _backup(self, vm: str, info: VmInfo, disks: list[DiskInfo], levels: dict[str, bitmaps.Level],
                point_id: str, new_bitmaps: dict[str, str], guard: Any = None) -> tuple[Manifest, dict[str, Any]]:
        scratch = self.scratch
        try:
            run_dir = graph.make_run_dir(scratch)
        except OSError as exc:  # read-only, full, not ours: nothing has been done to the VM yet
            raise UsageError(f"cannot create a run directory in {scratch}: {exc.strerror}; pass --scratch DIR on "
                             "a writable local filesystem with room for the guest's writes during the backup",
                             object=str(scratch)) from None
        owner = self.mon.peer_owner()
        try:  # QEMU creates the socket: a directory of its own if it runs as another user (handover.py)
            sock = str(handover.socket_dir(run_dir, owner, f"the QEMU process behind {self.req.qmp or 'its monitor'}",
                                           scratch) / "nbd.sock")
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        fleeces = [graph.DiskFleece(d, graph.FleeceNames.for_disk(d.id),
                                    run_dir / f"{graph.PREFIX}{graph.FleeceNames.for_disk(d.id).token}-{point_id}.qcow2")
                   for d in disks]
        names = {n for f in fleeces for n in f.names.all()}
        switched = False
        committed = False
        writer = None
        stats: dict[str, Any] = {"point": point_id}
        try:
            for f in fleeces:
                graph.create_scratch(f.scratch_file, f.disk.virtual_size)
                handover.give(f.scratch_file, owner)
                graph.add_target(self.mon, f)
                graph.add_cbw(self.mon, f)

            # The point in time: bitmaps switch and filters go in while the guest is paused.
            # A run killed inside the pause leaves a marker the next run resumes the guest by (pause.py).
            # --quiesce: the guest's filesystems frozen by its agent around exactly this (the agent cannot
            # answer while the guest is paused, so freeze first, thaw after the guest runs again).
            armed = guard.ready() if guard is not None else None  # up by now, or nearly: its start overlapped the planning
            with self._quiesced(info, point_id) as quiesce:
                t0 = time.perf_counter()
                with pause.paused(self.mon, point_id, info.running, armed):
                    self.event("freezing", {"point": point_id, "paused": info.running})
                    actions = [a for f in fleeces for a in bitmaps.freeze_actions(f.disk.node, new_bitmaps[f.disk.id],
                                                                                  levels[f.disk.id], None)]
                    bitmaps.transaction(self.mon, actions)
                    switched = True
                    for f in fleeces:
                        if not f.disk.offline:  # a shut-off VM's image: nothing but fleece writes it
                            graph.insert_cbw(self.mon, f)
                stats["pause_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            if info.offline:
                log.info("point in time fixed for %d image(s) of the shut-off VM", len(fleeces))
            else:
                log.info("point in time fixed for %d disk(s); guest paused %.1f ms", len(fleeces), stats["pause_ms"])
            self.event("frozen", {"point": point_id, "pause_ms": stats["pause_ms"]})

            for f in fleeces:
                graph.add_snapshot(self.mon, f)
            graph.start_nbd_server(self.mon, sock)
            for f in fleeces:
                lv = levels[f.disk.id]
                graph.export(self.mon, f, lv.old_bitmap if lv.kind == KIND_INCREMENTAL else None)
                graph.export_plan_sources(self.mon, f)
            self.event("exported", {"point": point_id, "disks": [f.disk.id for f in fleeces]})

            writer = self.repo.writer(on_committed=self.req.on_committed, known=self.known)
            pending = self._pull_all(fleeces, levels, sock, writer, new_bitmaps)
            self.event("pulled", {"point": point_id})
            for what in graph.unwind(self.mon, only=names):
                log.debug("teardown: %s", what)
            manifest = self._commit_point(vm, info, point_id, writer, pending, stats, **self._consistency(quiesce))
            committed = True
            return manifest, stats
        except BaseException as exc:
            self._fail(exc, writer, names, fleeces, levels, new_bitmaps, switched and not committed)
            raise
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)  # the fleece targets live in it

    def _pull_all(self, fleeces: list[Any], levels: dict[str, bitmaps.Level], sock: str, writer: Any,
                  new_bitmaps: dict[str, str | None]) -> dict[str, Callable[[], DiskRecord]]:
        """Read every disk into *writer*, one after the other (each with all workers); returns, per disk,
        the function that builds its record once the writer has flushed."""
        # Enough buffers for every reader plus what the writer queues; reading outpaces compression.
        pool = BufferPool(self.req.workers + 4, self.repo.config.chunk_size)
        return {f.disk.id: self._pull_disk(f, levels[f.disk.id], sock, writer, pool, new_bitmaps[f.disk.id])
                for f in fleeces}

    def _commit_point(self, vm: str, info: VmInfo, point_id: str, writer: Any,
                      pending: dict[str, Callable[[], DiskRecord]], stats: dict[str, Any],
                      extra: dict[str, Any] | None = None, consistency: str = "crash") -> Manifest:
        """Steps 2 and 3 of the commit protocol: flush the writer (packs, then the index), then write the
        manifest — the commit point. *extra* adds to the manifest's ``extra``."""
        self.event("flushing", {"point": point_id})
        wstats = writer.flush()
        # Only now has every blob's callback run: the extent maps are complete.
        records = {disk_id: finish() for disk_id, finish in pending.items()}
        stats["writer"] = wstats.as_dict()
        kind = KIND_FULL if all(r.kind == KIND_FULL for r in records.values()) else KIND_INCREMENTAL
        manifest = Manifest(
            id=point_id, vm=vm, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # the newest layer this point builds on (per-disk parents are in the disk records)
            parent=max((r.parent for r in records.values() if r.parent), default=None),
            kind=kind, disks=records, consistency=consistency, tool=TOOL,
            extra={"host": socket.gethostname(), "machine": self.machine.to_json(), "pause_ms": stats.get("pause_ms"),
                   "vm_state": info.status,  # running, paused, …, or "shut off" (backup --image)
                   "uploaded_bytes": wstats.uploaded_bytes, "workers": self.req.workers,
                   "index": self._hints(writer.index_name, records),
                   **(extra or {}), **annotation_fields(self.req.tags, self.req.note)})
        self.event("committing", {"point": point_id})
        self._check_identity(vm)  # again: another machine may have taken the name during this run
        self.repo.commit(manifest, writer.packs_needed())
        log.info("committed point %s of VM %s", point_id, vm)
        return manifest

    def _pull_disk(self, f: graph.DiskFleece, level: bitmaps.Level, sock: str, writer: Any, pool: BufferPool,
                   new_bitmap: str | None) -> Callable[[], DiskRecord]:
        """Read one disk into *writer*; returns a function that builds its record once the writer flushed."""
        disk = f.disk
        chunk = self.repo.config.chunk_size
        plan = self._plan(f, level, sock, chunk)
        report: AuditReport | None = None
        reason = level.reason
        if plan.kind == KIND_INCREMENTAL and self.req.audit_sample > 0:
            report = self._audit(f, level, plan, sock)
            if report.mismatches:
                off, length, what = report.mismatches[0]
                reason = (f"verified full: the dirty bitmap missed writes ({len(report.mismatches)} of "
                          f"{report.blobs + report.zero_ranges} sampled clean ranges changed since point "
                          f"{level.since}, first at offset {off}: {what})")
                log.error("disk %s: %s; reading the whole disk, uploading only what the repository lacks",
                          disk.id, reason)
                plan = self._plan(f, level, sock, chunk, full=True)
        if plan.rescued_bytes:
            log.info("disk %s: %d bytes changed by the guest since the freeze are read from the frozen view "
                     "(the fleece target holds them)", disk.id, plan.rescued_bytes)
        self.event("disk", {"disk": disk.id, "kind": plan.kind, "read_bytes": plan.read_bytes,
                            "dirty_bytes": plan.dirty_bytes, "jobs": len(plan.jobs),
                            "job_bytes": sum(j.length for j in plan.jobs)})
        extents: list[Extent] = [(o, n, None) for o, n in plan.zero]
        lock = threading.Lock()
        totals = {"stored_bytes": 0, "blobs": 0, "zero_read_bytes": 0}
        recorded = [0]

        def record(job: Job, ident: bytes | None, stored: int) -> None:
            with lock:
                recorded[0] += 1
                if ident is None:
                    totals["zero_read_bytes"] += job.length
                    if plan.kind == KIND_INCREMENTAL:
                        extents.append((job.offset, job.length, None))
                else:
                    extents.append((job.offset, job.length, ident))
                    totals["stored_bytes"] += stored
                    totals["blobs"] += 1
            if ident is None and self.req.on_committed is not None:
                self.req.on_committed(job.length, 0)  # reads as zero: recorded, nothing to upload

        puller = Puller(sock, f.names.export, writer, pool, workers=self.req.workers, disk=disk.id,
                        progress=self.req.progress)
        t0 = time.monotonic()
        try:
            puller.run(plan.jobs, record)
        except ExportReadError as exc:
            raise ExportReadError(f"{exc}{self._scratch_hint(f)}") from None
        seconds = round(time.monotonic() - t0, 3)
        granularity = next((b.granularity for b in disk.bitmaps if b.name == level.old_bitmap), None)

        def finish() -> DiskRecord:
            if recorded[0] != len(plan.jobs):  # never commit a map with holes in it
                raise QemuError(f"internal error: disk {disk.id}: {recorded[0]} of {len(plan.jobs)} blobs recorded")
            extents.sort()
            stats = {"dirty_bytes": plan.dirty_bytes, "read_bytes": plan.read_bytes,
                     "zero_bytes": sum(n for _, n, b in extents if b is None), **totals,
                     "seconds": seconds, "reason": reason}
            if report is not None:
                stats["audit"] = report.to_json()
            record = DiskRecord(kind=plan.kind, virtual_size=disk.virtual_size, extents=extents,
                                granularity=granularity or disk.cluster_size or 65536, qcow2=disk.qcow2_options(),
                                bitmap=new_bitmap if level.track else None, stats=stats,
                                parent=level.since if plan.kind == KIND_INCREMENTAL else None)
            return self._bounded(record, disk.id, level)

        return finish

    def _bounded(self, record: DiskRecord, disk: str, level: bitmaps.Level) -> DiskRecord:
        """An incremental whose parent chain has ``MAX_CHAIN`` layers already is stored merged: its layer
        and the chain's, resolved into one self-contained full (a manifest operation: the same blobs, no
        data read or sent). Chains stay bounded without a ``forget`` — restore writes at most that many
        layers, and the next backup reads at most that many manifests."""
        if record.kind != KIND_INCREMENTAL or level.since is None:
            return record
        chain = self.repo.disk_chain(self.repo.manifest(self.vm, level.since), disk)
        if len(chain) < MAX_CHAIN:
            return record
        me = Manifest(id="(this backup)", vm=self.vm, created="", parent=None, kind=KIND_INCREMENTAL,
                      disks={disk: record})
        merged = merged_record([me, *chain], disk)
        log.info("disk %s: the chain reached %d layers: this point stores it merged (self-contained)", disk,
                 len(chain) + 1)
        merged.stats.pop("layer_of", None)  # its own layer: nothing to look up
        merged.stats.pop("states_of", None)
        merged.stats["merged_from"] = [m.id for m in chain]
        return merged

    def _hints(self, index_name: str | None, records: dict[str, DiskRecord]) -> list[str]:
        """The point's ``extra.index``: its run's index object, and for a disk stored merged
        (:meth:`_bounded`) those of the layers merged into it."""
        hints = [index_name] if index_name else []
        for disk, record in records.items():
            for point_id in record.stats.get("merged_from", []):
                try:
                    hints.extend(self.repo.manifest(self.vm, point_id).index_hints)
                except RepositoryError:
                    continue
        return list(dict.fromkeys(hints))[:MAX_HINTS]

    def _known_blobs(self, levels: dict[str, bitmaps.Level]) -> set[bytes] | None:
        """For a run of incrementals only: the blobs of each disk's parent view (what it dedups against:
        the parent is its VM's newest point, which forget always keeps, and a merge of its chain keeps
        every blob its view shows — so prune keeps them). ``None`` when a disk gets a full."""
        if not levels or any(lv.kind != KIND_INCREMENTAL or lv.since is None for lv in levels.values()):
            return None
        known: set[bytes] = set()
        for disk, lv in levels.items():
            # the blobs the parent's view shows, not every blob of its layers: a forget merging the chain
            # keeps exactly these (a blob a newer layer hid entirely may go, and its pack with it)
            known.update(p.blob for p in self.repo.resolve(self.repo.manifest(self.vm, lv.since), disk)
                         if p.blob is not None)
        return known

    def _audit(self, f: graph.DiskFleece, level: bitmaps.Level, plan: DiskPlan, sock: str) -> AuditReport:
        """Re-read a sample of clean ranges and compare them with the parent point (see audit.py)."""
        assert level.since is not None
        chain = self.repo.disk_chain(self.repo.manifest(self.vm, level.since), f.disk.id)
        sample = choose_sample(chain, f.disk.id, plan.dirty, f.disk.virtual_size, self.req.audit_sample,
                               random.Random())

        def connect() -> nbd.NBD:
            h = nbd.NBD()
            h.set_export_name(f.names.export)
            h.connect_unix(sock)
            return h

        try:
            readable = self.repo.envelope.can_read  # a write-only key compares whole blobs by id only
            hints = [h for m in chain for h in m.index_hints]
            report = audit(connect, sample,
                           lambda ids: dict(self.repo.iter_blobs(ids, hints=hints)) if readable else {},
                           ident=self.repo.envelope.blob_id)
        except nbd.Error as exc:
            raise ExportReadError(f"reading the audit sample of disk {f.disk.id} failed: {exc}"
                                  f"{self._scratch_hint(f)}") from None
        log.info("disk %s: bitmap audit read %d clean blobs and %d zero ranges (%d bytes, %.2f s): %s",
                 f.disk.id, report.blobs, report.zero_ranges, report.bytes_read, report.seconds,
                 f"{len(report.mismatches)} MISMATCHES" if report.mismatches else "all as recorded")
        if report.truncated and not report.mismatches:
            log.warning("disk %s: the bitmap audit ran out of time (%.0f s) before its whole sample was read: "
                        "this incremental is only partly verified (the storage behind the VM is slow)",
                        f.disk.id, report.seconds)
        return report

    def _plan(self, f: graph.DiskFleece, level: bitmaps.Level, sock: str, chunk: int,
              full: bool = False) -> DiskPlan:
        def handle(export: str, context: str) -> nbd.NBD:
            h = nbd.NBD()
            h.add_meta_context(context)
            h.set_export_name(export)
            h.connect_unix(sock)
            if not h.can_meta_context(context):
                raise QemuError(f"the NBD export {export} of disk {f.disk.id} does not offer {context}")
            return h

        handles: list[nbd.NBD] = []

        def opened(export: str, context: str) -> nbd.NBD:
            h = handle(export, context)
            handles.append(h)
            return h

        try:
            size = f.disk.virtual_size
            incremental = level.kind == KIND_INCREMENTAL and not full
            src, bitmap = self._plan_sources(f, level, opened, incremental)
            src.between = lambda: self.event("planning", {"disk": f.disk.id})
            if incremental:
                assert bitmap is not None
                return plan_incremental(src, bitmap, size, chunk)
            return plan_full(src, size, chunk)
        except nbd.Error as exc:
            raise ExportReadError(f"block status of disk {f.disk.id} failed: {exc}{self._scratch_hint(f)}") from None
        finally:
            for h in handles:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass

    #: what the quiesce messages call the machine ("the guest is paused: its agent cannot freeze …")
    _subject = "guest"

    def _pause_guard(self, info: VmInfo) -> Any:
        """The pause guard on its way up (pause.py), for a running guest fleece reaches by its QMP socket;
        None for a guest that will not be paused (the user paused it, a shut-off image)."""
        if not info.running or info.offline or not self.req.qmp:
            return None
        from .agent import GuardLaunch

        # Spawned now, awaited just before the pause: its ~0.07 s start-up overlaps the planning, and is
        # over before the pause (started alongside it, it lengthened the pause 16 → 22–29 ms on this 2-core
        # host). It holds the VM's locks, so no next run pauses the guest while it may resume it.
        # Absolute: it runs from /.
        return GuardLaunch(["--qmp", os.path.abspath(self.req.qmp), "--timeout", "30"])

    @contextlib.contextmanager
    def _quiesced(self, info: VmInfo, point_id: str) -> Iterator[Any]:
        """``--quiesce``: the guest agent's freeze around the point in time (agent.py), announced by the
        "quiesced" event; else nothing (``None``)."""
        if not self.req.quiesce:
            yield None
            return
        from .agent import quiesced

        if info.status != "running":
            freeze = quiesced(None, f"the {self._subject} is {info.status}: its agent cannot freeze its filesystems")
        else:
            freeze = quiesced(self._freezer())
        with freeze as quiesce:
            self.event("quiesced", {"point": point_id, **quiesce.to_json()})
            yield quiesce

    def _freezer(self) -> Any:
        """The agent.Freezer of this machine (``--qga``: its chardev socket)."""
        from .agent import QgaFreezer

        assert self.req.qga is not None  # run_backup checked
        return QgaFreezer(self.req.qga, self.req.quiesce_timeout, self.req.qmp)

    @staticmethod
    def _consistency(quiesce: Any) -> dict[str, Any]:
        """The manifest's ``consistency`` and ``extra.quiesce`` for what :meth:`_quiesced` yielded."""
        if quiesce is None:
            return {"consistency": "crash"}
        return {"consistency": quiesce.consistency, "extra": {"quiesce": quiesce.to_json()}}

    def _plan_sources(self, f: graph.DiskFleece, level: bitmaps.Level, handle: Callable[[str, str], nbd.NBD],
                      incremental: bool) -> tuple[PlanSources, str | None]:
        """Our own fleece's three exports (plan.py says why three) and the frozen bitmap's name."""
        src = PlanSources(allocation=handle(f.names.live_export, ALLOCATION),
                          target=handle(f.names.target_export, ALLOCATION))
        if not incremental:
            return src, None
        assert level.old_bitmap is not None
        src.dirty = handle(f.names.export, f"qemu:dirty-bitmap:{level.old_bitmap}")
        return src, level.old_bitmap

    @staticmethod
    def _scratch_hint(f: graph.DiskFleece) -> str:
        try:
            scratch = f.scratch_file.parent.parent  # the file lives in this run's directory under --scratch
            st = os.statvfs(scratch)
        except OSError:
            return ""
        free = st.f_bavail * st.f_frsize
        if free < 64 << 20:
            return (f" — the scratch directory {scratch} is full ({free >> 20} MiB free): the guest "
                    "kept running, the backup could not keep its point in time; use --scratch with more room")
        return ""

    def _fail(self, exc: BaseException, writer: Any, names: set[str], fleeces: list[graph.DiskFleece],
              levels: dict[str, bitmaps.Level], new_bitmaps: dict[str, str], fold_back: bool) -> None:
        """Undo a failed run: graph first, then give every write back to the old bitmaps.

        The reason is not logged here: the caller reports the error once. The whole run is under
        :func:`interrupt_once`, so an impatient user's second Ctrl-C cannot cut this short and leave a
        fleece in the VM or a half-folded bitmap (aborting the writer is prompt: pacing and back-off waits
        are cancelled).
        """
        interrupted = isinstance(exc, KeyboardInterrupt)
        log.warning("%s; rolling back (the VM keeps running)", "interrupted" if interrupted else "backup failed")
        if writer is not None:
            try:
                writer.abort()
            except BaseException as e:  # noqa: BLE001 - whatever the writer says, QEMU comes next
                log.debug("writer abort: %r", e)
        # under interrupt_once(): a second Ctrl-C cannot cut the teardown short
        try:
            for what in graph.unwind(self.mon, only=names):
                log.debug("rollback: removed %s", what)
        except Exception as e:  # noqa: BLE001 - keep going: bitmaps matter more
            log.error("could not tear the fleece down (%s); the next run will clean up", e)
        if fold_back:
            try:
                actions = [a for f in fleeces for a in
                           bitmaps.rollback_actions(f.disk.node, new_bitmaps[f.disk.id], levels[f.disk.id])]
                bitmaps.transaction(self.mon, actions)
                log.info("dirty bitmaps restored: the next incremental covers everything since the last point")
            except Exception as e:  # noqa: BLE001
                log.error("could not fold the dirty bitmaps back (%s); the next run will repair them", e)

    def _drop_old_bitmaps(self, disk: DiskInfo, keep: str) -> None:
        """After the commit: the parent's bitmap (and stale ones of this repository) are no longer needed."""
        try:
            current = next((d for d in self.inventory().disks if d.id == disk.id), None)
            if current is not None:
                bitmaps.transaction(self.mon, bitmaps.commit_actions(current.node, keep, current.bitmaps, self.prefix))
        except Exception as e:  # noqa: BLE001 - the point is committed; the next run finishes this
            log.warning("point committed, but old bitmaps on %s could not be removed yet (%s)", disk.id, e)
