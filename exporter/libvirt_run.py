"""A backup run of a libvirt domain: libvirt freezes and exports, fleece plans, pulls and commits.

libvirt owns a domain's QMP socket, so fleece cannot build its own fleece there; it asks libvirt for a
pull-mode backup job with a checkpoint instead (exporter/virt.py; what libvirt 9.0 does is measured in
docs/libvirt-pull-mode.md). The rest of the run — levels, plan, audit, pull, writer, manifest — is the
QMP run's (:class:`~fleece.exporter.backup._Run`), through the same methods.

The commit protocol, mapped onto checkpoints (``fleece-<repo id>-<point id>``, one per point):

1. ``backupBegin`` creates the new point's checkpoint and the frozen view in one QMP transaction;
2. every disk is read, then the job is ended (libvirt deletes its scratch images);
3. the writer flushes, the manifest is written — the commit point;
4. only then are this repository's checkpoints that no disk's newest layer refers to deleted (the
   parent's, unless a disk left out of this run still builds on it).

Why nothing has to be folded back on failure, unlike QMP bitmaps: libvirt keeps *every* checkpoint's
bitmap recording, so the parent's checkpoint has kept tracking through the failed run and the next
incremental from it is exact; the failed run's own checkpoint is merely superfluous and is deleted (now,
or by the next run if this one was killed). A job a killed run left running is ended by the next run —
it is recognisable by its socket in a fleece run directory — and any other tool's job is left alone.
A checkpoint QEMU lost (QEMU killed: libvirt reports it inconsistent) turns that disk into a logged full.

One run per domain at a time: the lock is keyed on the domain's UUID, which is also its identity in the
history (identity.py), so two domains of the same name on two hosts never share one silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleece.repository import Repository
from fleece.repository.errors import BackupBusyError, LibvirtError, QemuError, UsageError
from fleece.repository.manifest import KIND_FULL, KIND_INCREMENTAL, Manifest, check_vm_name, new_point_id

from . import bitmaps, graph, handover, virt
from .backup import BackupRequest, BackupResult, _Run, interrupt_once
from .identity import Machine
from .inventory import DiskInfo, VmInfo
from .lock import VmLock
from .plan import ALLOCATION, PlanSources

log = logging.getLogger(__name__)

#: Unix socket paths must fit in sockaddr_un (108 bytes with the NUL).
MAX_SOCKET_PATH = 107
#: libvirt's domain states (virDomainState) by number, as ``virsh domstate`` words them.
_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shut off", 6: "crashed",
           7: "pmsuspended"}


@dataclass
class _Names:
    export: str  # the NBD export of the disk's frozen view (libvirt names it after the target)


@dataclass
class VirtFleece:
    """One disk of libvirt's backup job, shaped like :class:`graph.DiskFleece` where the run reads it."""

    disk: DiskInfo
    names: _Names
    scratch_file: Path  # libvirt's scratch image (in the run directory: the scratch-full hint looks there)
    bitmap: str | None  # the export's dirty bitmap (``backup-<target>``) of an incremental disk


class LibvirtFreezer:
    """The guest agent's freeze through libvirt (which owns the agent's channel), as agent.py's Freezer.

    libvirt's errors become AgentError, so a domain without an agent channel
    (``VIR_ERR_ARGUMENT_UNSUPPORTED``) or whose agent does not answer (``VIR_ERR_AGENT_UNRESPONSIVE``)
    falls back to a crash-consistent point with libvirt's reason, like a missing agent socket does.
    Someone else's freeze is found first (the agent's status through libvirt's pass-through) and left
    alone; after that, any failure of the freeze but "no agent" is thawed (libvirt's VIR_ERR_INTERNAL_ERROR
    covers both the agent's refusal and an agent that died mid-freeze; a timeout may still freeze).
    """

    #: libvirt codes of a freeze that certainly froze nothing (not VIR_ERR_INTERNAL_ERROR: libvirt uses it for
    #: the agent's refusal *and* for an agent that died mid-freeze; someone else's freeze is found first)
    NOT_FROZEN = frozenset({"VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_ERR_OPERATION_INVALID"})

    def __init__(self, dom: Any, timeout: float, uri: str | None = None) -> None:
        self.dom = dom
        self.timeout = timeout
        self.uri = uri
        self.what = f"the guest agent of domain {dom.name()}"

    @classmethod
    def reach(cls, uri: str, uuid: str, timeout: float) -> LibvirtFreezer:
        """The freezer of domain *uuid* on *uri* (the thaw guard's own connection)."""
        return cls(virt.domain(virt.connect(uri), uuid), timeout, uri)

    def freeze(self, arm: Any) -> int:
        from .agent import AgentError

        try:
            state = virt.agent_state(self.dom)
        except LibvirtError as e:  # nothing was sent: a crash-consistent point, not a failed backup
            raise AgentError(str(e), stage="status", object=self.dom.name(), maybe_frozen=False) from None
        if state != "connected":
            raise AgentError(f"domain {self.dom.name()} has no guest agent channel (add <channel type='unix'>"
                             f"<target type='virtio' name='{virt.AGENT_CHANNEL}'/></channel>)" if state is None else
                             f"no guest agent is connected to domain {self.dom.name()}'s channel (is "
                             "qemu-guest-agent running in the guest?)", stage="connect", object=self.dom.name(),
                             maybe_frozen=False)
        try:
            virt.agent_timeout(self.dom, max(1, round(self.timeout)))
        except LibvirtError as e:
            raise AgentError(str(e), stage="status", object=self.dom.name(), maybe_frozen=False) from None
        if virt.fs_frozen(self.dom, max(1, round(self.timeout))):
            raise AgentError(f"the filesystems of domain {self.dom.name()} are already frozen (not by this "
                             "backup, which leaves them so); virsh domfsthaw thaws them", stage="status",
                             object=self.dom.name(), maybe_frozen=False)
        arm()
        try:
            return virt.fs_freeze(self.dom)
        except LibvirtError as e:
            raise AgentError(str(e), stage="freeze", object=self.dom.name(),
                             maybe_frozen=e.code not in self.NOT_FROZEN) from None

    def thaw(self) -> int:
        from .agent import AgentError

        try:
            return virt.fs_thaw(self.dom)
        except LibvirtError as e:
            raise AgentError(str(e), stage="thaw", object=self.dom.name()) from None

    def reset(self) -> None:
        """libvirt keeps the agent's connection; the domain's agent timeout goes back to block, what a
        domain starts with (virt.agent_timeout: there is no call to read what it was)."""
        with contextlib.suppress(LibvirtError):
            virt.agent_timeout(self.dom, None)

    def guard_args(self) -> list[str] | None:
        if self.uri is None:
            return None
        return ["--libvirt", self.uri, self.dom.UUIDString(), "--timeout", str(self.timeout)]


def backup_domain(repo: Repository, req: BackupRequest, scratch: Path) -> BackupResult:
    """Back up the libvirt domain ``req.libvirt`` (name or UUID) on ``req.connect``."""
    assert req.libvirt is not None
    if not req.libvirt:
        raise UsageError("--libvirt is empty: pass the domain's name or UUID (virsh list)")
    conn = virt.connect(req.connect)
    try:
        dom = virt.domain(conn, req.libvirt)
        uuid = dom.UUIDString()
        with interrupt_once(), VmLock(f"libvirt:{uuid}", f"libvirt domain {dom.name()} ({uuid})"):
            return _LibvirtRun(repo, req, conn, dom, scratch).run()
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a connection whose daemon went away
            pass


def running_domains(uri: str | None) -> list[str]:
    """The running domains of *uri*, for ``backup --all``."""
    conn = virt.connect(uri)
    try:
        return virt.running_domains(conn)
    finally:
        conn.close()


def _qcow2_details(path: str) -> tuple[int | None, str | None]:
    """Cluster size and compat level of a qcow2 image in use (``qemu-img info -U`` takes no lock), for
    restore to recreate a faithful image; (None, None) where it cannot say (a network disk)."""
    try:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    import json

    info = json.loads(out)
    spec = info.get("format-specific") or {}
    compat = (spec.get("data") or {}).get("compat") if spec.get("type") == "qcow2" else None
    return info.get("cluster-size"), compat


class _LibvirtRun(_Run):
    def __init__(self, repo: Repository, req: BackupRequest, conn: Any, dom: Any, scratch: Path) -> None:
        super().__init__(repo, req, mon=None, scratch=scratch, inventory=self._inspect)  # type: ignore[arg-type]
        self.conn = conn
        self.dom = dom
        self.uuid: str = dom.UUIDString()
        self._vdisks: dict[str, virt.VirtDisk] = {}

    # -- what the domain looks like ------------------------------------------------------------------------

    def _inspect(self) -> VmInfo:
        """The domain's disks by target name (``vda``, ``sda``: libvirt's names, stable across restarts)."""
        state = self.dom.state()[0]
        if state not in (1, 3, 7):  # running, paused, pmsuspended: a QEMU process exists
            raise UsageError(f"libvirt domain {self.dom.name()} is {_STATES.get(state, state)}: only a running "
                             "domain can be backed up with --libvirt; back up a shut-off one's images with "
                             "--image PATH", object=self.dom.name())
        self._vdisks = {d.target: d for d in virt.disks(self.dom)}
        disks = []
        for d in self._vdisks.values():
            try:
                size = int(self.dom.blockInfo(d.target)[0])
            except Exception as e:  # noqa: BLE001 - libvirtError; an empty tray, a vanished disk
                log.debug("blockInfo %s: %r", d.target, e)
                size = 0
            cluster, compat = _qcow2_details(d.path) if d.format == "qcow2" and d.path.startswith("/") else (None, None)
            disks.append(DiskInfo(id=d.target, qdev=d.device or d.target, node=d.node or "", driver=d.format,
                                  virtual_size=size, filename=d.path, chain=[d.path] if d.path else [],
                                  read_only=d.read_only or d.kind in ("cdrom", "floppy"), cluster_size=cluster,
                                  compat=compat))
        return VmInfo(name=self.dom.name(), status=_STATES.get(state, str(state)), disks=disks)

    def _machine(self, info: VmInfo) -> Machine:
        return Machine(uuid=self.uuid, host=socket.gethostname(),
                       images={d.id: [os.path.realpath(d.filename) if d.filename.startswith("/") else d.filename]
                               for d in info.disks if d.filename and not d.read_only})

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> BackupResult:
        started = time.monotonic()
        self._end_leftover_job()
        info = self.inventory()
        vm = self.req.vm or info.name
        self.vm = check_vm_name(vm)
        self.repo.check_not_downgraded()
        self.machine = self._machine(info)
        self._check_identity(vm)
        self._tidy_checkpoints(info)
        disks = self._select(info)
        forced = self._forced_full(info, disks)
        bases = self.repo.latest_layers(vm, [d.id for d in disks])
        cps = {c.name: c for c in virt.checkpoints(self.dom)}
        levels = {d.id: self._level(d, bases[d.id], d.id in forced, cps) for d in disks}
        self.known = self._known_blobs(levels)
        if self.known is None:
            self.repo.load_index()
        for d in disks:
            log.info("disk %s: %s backup (%s)", d.id, levels[d.id].kind, levels[d.id].reason)
        point_id = new_point_id()
        checkpoint = f"{self.prefix}{point_id}"
        manifest, stats = self._backup_domain(vm, info, disks, levels, point_id, checkpoint)
        self.event("committed", {"point": manifest.id})
        self._tidy_checkpoints(self.inventory(), keep=checkpoint)
        stats["duration_s"] = round(time.monotonic() - started, 3)
        return BackupResult(manifest, stats)

    def _level(self, disk: DiskInfo, parent: Manifest | None, force_full: bool,
               cps: dict[str, virt.Checkpoint]) -> bitmaps.Level:
        """Incremental only from the parent's own checkpoint, and only while libvirt still has its bitmap
        on this disk; the checkpoint's name is what the parent's record keeps as its ``bitmap``."""
        if disk.driver != "qcow2":
            return bitmaps.Level(KIND_FULL, None, f"a {disk.driver} disk cannot hold a checkpoint's dirty bitmap: "
                                                  "every backup of it is a full", [], track=False)
        record = parent.disks.get(disk.id) if parent else None
        if parent is None or record is None:
            return bitmaps.Level(KIND_FULL, None, f"no earlier point of this VM holds disk {disk.id}", [])
        name = record.bitmap
        cp = cps.get(name) if name else None
        if name is None or cp is None:
            return bitmaps.Level(KIND_FULL, None, f"checkpoint {name or '(none)'} of point {parent.id} is gone "
                                                  "(deleted, or the domain was redefined)", [])
        if not cp.disks.get(disk.id):
            return bitmaps.Level(KIND_FULL, None, f"checkpoint {name} has no bitmap on disk {disk.id}", [])
        if force_full:
            return bitmaps.Level(KIND_FULL, name, "--full requested", [])
        if record.virtual_size != disk.virtual_size:
            return bitmaps.Level(KIND_FULL, name, f"disk resized from {record.virtual_size} to "
                                                  f"{disk.virtual_size} bytes", [])
        return bitmaps.Level(KIND_INCREMENTAL, name, f"checkpoint {name} tracks every change since point "
                                                     f"{parent.id}", [], since=parent.id)

    def _backup_domain(self, vm: str, info: VmInfo, disks: list[DiskInfo], levels: dict[str, bitmaps.Level],
                       point_id: str, checkpoint: str) -> tuple[Manifest, dict[str, Any]]:
        try:
            run_dir = graph.make_run_dir(self.scratch)
        except OSError as exc:
            raise UsageError(f"cannot create a run directory in {self.scratch}: {exc.strerror}; pass --scratch DIR "
                             "on a writable local filesystem with room for the guest's writes during the backup",
                             object=str(self.scratch)) from None
        sock = str(run_dir / "nbd.sock")
        stats: dict[str, Any] = {"point": point_id, "pause_ms": None}
        writer = None
        begun = False
        try:
            # QEMU creates the socket: a directory of its own if it runs as another user (handover.py);
            # libvirtd (root) makes the scratch images in the run directory and labels them for QEMU
            sock = str(handover.socket_dir(run_dir, virt.qemu_owner(self.dom), f"the QEMU of domain "
                                           f"{self.dom.name()}", self.scratch) / "nbd.sock")
            if len(sock) > MAX_SOCKET_PATH:
                raise UsageError(f"the scratch directory {self.scratch} is too deep for the NBD socket libvirt "
                                 f"creates in it ({len(sock)} > {MAX_SOCKET_PATH} bytes); pass a shorter --scratch",
                                 object=str(self.scratch))
            self.event("freezing", {"point": point_id, "paused": False})
            # --quiesce: libvirt 9.0 has no quiesce flag for pull backups or checkpoints (it rejects
            # VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE): freeze through libvirt's agent, begin, thaw.
            with self._quiesced(info, point_id) as quiesce:
                t0 = time.perf_counter()
                job = self._begin(disks, levels, sock, run_dir, checkpoint)
                begun = True
                stats["freeze_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            log.info("point in time fixed for %d disk(s) of domain %s by libvirt (backupBegin %.1f ms)",
                     len(disks), self.dom.name(), stats["freeze_ms"])
            self.event("frozen", {"point": point_id, "pause_ms": None, "freeze_ms": stats["freeze_ms"]})
            fleeces = []
            for d in disks:
                exported = job.disks.get(d.id)
                if exported is None:
                    raise QemuError(f"libvirt's backup job of {self.dom.name()} does not export disk {d.id}")
                bitmap = None
                if levels[d.id].kind == KIND_INCREMENTAL:
                    bitmap = exported.bitmap or f"backup-{d.id}"
                fleeces.append(VirtFleece(d, _Names(exported.export), run_dir / f"{d.id}.scratch", bitmap))
            self.event("exported", {"point": point_id, "disks": [f.disk.id for f in fleeces]})
            writer = self.repo.writer(on_committed=self.req.on_committed, known=self.known)
            new = {d.id: (checkpoint if levels[d.id].track else None) for d in disks}
            pending = self._pull_all(fleeces, levels, sock, writer, new)
            self.event("pulled", {"point": point_id})
            virt.end_backup(self.dom)  # the guest stops paying for copy-before-write now
            begun = False
            libvirt_extra = {"uri": self.conn.getURI(), "domain": self.dom.name(), "uuid": self.uuid,
                             "checkpoint": checkpoint, "freeze_ms": stats["freeze_ms"]}
            how = self._consistency(quiesce)
            manifest = self._commit_point(vm, info, point_id, writer, pending, stats,
                                          {"libvirt": libvirt_extra, **how.get("extra", {})}, how["consistency"])
            return manifest, stats
        except BaseException:
            self._fail_domain(writer, begun, sock, checkpoint)
            raise
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _begin(self, disks: list[DiskInfo], levels: dict[str, bitmaps.Level], sock: str, run_dir: Path,
               checkpoint: str) -> virt.BackupJob:
        """backupBegin; a parent checkpoint libvirt calls inconsistent (QEMU was killed and lost its
        bitmap) makes its disks a logged full, and the broken checkpoint is deleted."""
        while True:
            modes: dict[str, virt.Mode] = {d.id: levels[d.id].kind for d in disks}  # type: ignore[misc]
            since = {d.id: levels[d.id].old_bitmap for d in disks
                     if levels[d.id].kind == KIND_INCREMENTAL and levels[d.id].old_bitmap}
            track = [d.id for d in disks if levels[d.id].track]
            try:
                return virt.begin_pull_backup(self.dom, sock, str(run_dir), modes, since, checkpoint,
                                              checkpoint_disks=track)
            except LibvirtError as e:
                if e.code != "VIR_ERR_CHECKPOINT_INCONSISTENT" or not since:
                    raise
                broken = sorted(set(since.values()))
                log.warning("libvirt: %s — QEMU lost the dirty bitmap (it was killed or crashed): disk(s) %s get a "
                            "full backup instead, checkpoint(s) %s are deleted", e, ", ".join(sorted(since)),
                            ", ".join(broken))
                for d in disks:
                    lv = levels[d.id]
                    if lv.kind == KIND_INCREMENTAL:
                        levels[d.id] = bitmaps.Level(KIND_FULL, None, f"checkpoint {lv.old_bitmap} is inconsistent "
                                                     "(QEMU lost its bitmap): full", [], track=lv.track)
                virt.delete_checkpoint(self.dom, checkpoint, metadata_only=True)  # in case begin got that far
                for name in broken:
                    self._delete_checkpoint(name)
                if self.known is not None:  # the run is no longer incrementals only: dedup against everything
                    self.known = None
                    self.repo.load_index()

    _subject = "domain"

    def _freezer(self) -> LibvirtFreezer:
        """libvirt owns the agent's channel: freeze through it."""
        return LibvirtFreezer(self.dom, self.req.quiesce_timeout, self.conn.getURI())

    def _plan_sources(self, f: Any, level: bitmaps.Level, handle: Any,
                      incremental: bool) -> tuple[PlanSources, str | None]:
        """One export: libvirt's frozen view, whose own ``base:allocation`` is right at the freeze (plan.py
        PlanSources), and for an incremental its ``backup-<target>`` bitmap."""
        src = PlanSources(allocation=handle(f.names.export, ALLOCATION), target=None)
        if not incremental:
            return src, None
        src.dirty = handle(f.names.export, f"qemu:dirty-bitmap:{f.bitmap}")
        return src, f.bitmap

    # -- leftovers and rollback ----------------------------------------------------------------------------

    def _end_leftover_job(self) -> None:
        """A backup job of a killed fleece run is ended; anyone else's is not ours to end."""
        job = virt.active_backup(self.dom)
        if job is None:
            return
        sock = Path(job.socket) if job.socket else None
        if sock is not None and sock.name == "nbd.sock" and any(
                d.name.startswith(f"{graph.PREFIX}run-") for d in (sock.parent, sock.parent.parent)):
            virt.end_backup(self.dom)
            log.warning("cleaned up after an interrupted run: ended the backup job it left running on domain %s "
                        "(socket %s)", self.dom.name(), sock)
            return
        raise BackupBusyError(f"libvirt domain {self.dom.name()} has a backup job of another tool running (NBD "
                              f"{job.socket or 'over TCP'}); wait for it to finish, or end it with "
                              f"'virsh domjobabort {self.dom.name()}'", object=self.dom.name())

    def _fail_domain(self, writer: Any, begun: bool, sock: str, checkpoint: str) -> None:
        """Undo a failed run: end our job, drop our checkpoint. Nothing to fold back (module docstring)."""
        log.warning("backup failed; rolling back (the domain keeps running)")
        if writer is not None:
            try:
                writer.abort()
            except BaseException as e:  # noqa: BLE001 - libvirt comes next
                log.debug("writer abort: %r", e)
        try:
            job = virt.active_backup(self.dom)
            if job is not None and job.socket == sock:
                virt.end_backup(self.dom)
        except Exception as e:  # noqa: BLE001
            log.error("could not end the backup job of %s (%s); the next run will", self.dom.name(), e)
        try:
            self._delete_checkpoint(checkpoint)
        except Exception as e:  # noqa: BLE001 - harmless: the next run deletes it
            log.warning("could not delete checkpoint %s of the failed run (%s); the next run will", checkpoint, e)

    def _delete_checkpoint(self, name: str) -> bool:
        try:
            return virt.delete_checkpoint(self.dom, name)
        except LibvirtError as e:
            # a bitmap QEMU lost (killed): libvirt cannot remove it, only forget the checkpoint
            log.debug("delete checkpoint %s: %s; deleting libvirt's record only", name, e)
            return virt.delete_checkpoint(self.dom, name, metadata_only=True)

    def _tidy_checkpoints(self, info: VmInfo, keep: str | None = None) -> None:
        """Delete this repository's checkpoints that no disk's newest layer refers to: a failed or killed
        run's, and after a commit the parent's (libvirt deletes a checkpoint on *every* disk, so one a
        disk left out of this run still builds on is kept). Other repositories' and tools' checkpoints
        are never touched. Called before the run and after the commit (step 4): a failure there costs
        nothing but a checkpoint the next run deletes."""
        try:
            ours = [c.name for c in virt.checkpoints(self.dom) if c.name.startswith(self.prefix) and c.name != keep]
            if not ours:
                return
            ids = {d.id for d in info.disks}
            latest = self.repo.latest_layers(self.vm, sorted(ids)) if self.repo.point_ids(self.vm) else {}
            used = {m.disks[d].bitmap for d, m in latest.items() if m is not None and d in m.disks}
            for name in ours:
                if name in used:
                    continue
                point = name[len(self.prefix):]
                if self._delete_checkpoint(name):
                    log.info("deleted checkpoint %s (%s)", name, "point committed, superseded"
                             if point in set(self.repo.point_ids(self.vm)) else "left by a run that did not commit")
        except Exception as e:  # noqa: BLE001 - the point (if any) is committed; the next run finishes this
            if keep is None:
                raise
            log.warning("point committed, but old checkpoints of %s could not be deleted yet (%s)", self.dom.name(), e)
