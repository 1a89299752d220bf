"""A thin, typed layer over python3-libvirt for libvirt-managed domains: connect, find disks, checkpoints,
and a pull-mode backup job (``virDomainBackupBegin``). No backup logic, no printing.

Why libvirt instead of fleece's own QMP fleece: a libvirt domain's QMP socket belongs to libvirtd (one client
at a time), and libvirt must know about every block node and bitmap in its domain, or it will trip over
them later (migration, snapshots, its own backups). So for these domains libvirt builds the point-in-time
view and the NBD export, and fleece only plans and pulls over NBD, exactly as it does for its own export.

What libvirt 9.0 does with QEMU 7.2 (measured; docs/libvirt-pull-mode.md has the QMP it sends):

* a pull backup is the *classic* fleece: per disk a scratch qcow2 (created by libvirt in the file we name,
  mode 0600, backing = the live disk) and ``blockdev-backup sync=none`` disk → scratch, all in one
  ``transaction`` with the new checkpoint's bitmaps; then ``nbd-server-start`` on our unix socket and a
  read-only ``block-export-add`` of the *scratch* node, named after the disk's target (``vda``).
* an incremental disk's export carries one bitmap, ``backup-<target>`` (``qemu:dirty-bitmap:backup-vda``):
  a disabled copy of the checkpoint's bitmap, which has been recording since that checkpoint (libvirt
  keeps every checkpoint bitmap recording, so "changed since X" is the bitmap X alone).
* ``base:allocation`` of that export is trustworthy for ranges the guest zeroes or discards during the
  backup (copy-before-write copies the old clusters into the scratch image first): the §5e pitfall of
  QEMU's snapshot-access export does not apply here.
* if the scratch file cannot grow (ENOSPC), QEMU fails the *guest's* writes while the job keeps running:
  the scratch directory needs room for everything the guest may overwrite during the backup.
* the job outlives the client that started it: nothing ends it but :func:`end_backup` (any connection),
  a domain stop, or libvirtd. A second ``backupBegin`` while one runs blocks for 30 s and then fails with
  ``VIR_ERR_OPERATION_TIMEOUT``: look with :func:`active_backup` first.

Every libvirt failure becomes :class:`~fleece.repository.errors.LibvirtError` with libvirt's symbolic code
(decide on ``code``, never on the text); a domain name that does not exist is a ``UsageError``.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from xml.sax.saxutils import escape, quoteattr

import libvirt

from fleece.repository.errors import LibvirtError, UsageError

Mode = Literal["full", "incremental", "skip"]
T = TypeVar("T")

# python3-libvirt prints every error to stderr ("libvirt: QEMU Driver error : …") unless a handler is set;
# fleece reports errors itself, as one line.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_CODES = {getattr(libvirt, n): n for n in dir(libvirt)
          if n.startswith("VIR_ERR_") and isinstance(getattr(libvirt, n), int)
          and n not in ("VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR")}


def error_code(e: libvirt.libvirtError) -> str | None:
    """libvirt's symbolic code of *e* (``VIR_ERR_NO_DOMAIN_BACKUP`` …), or None."""
    return _CODES.get(e.get_error_code())


def _fail(e: libvirt.libvirtError, what: str, obj: str | None = None) -> LibvirtError:
    msg = " ".join((e.get_error_message() or str(e)).split())  # one line, whatever libvirt put in
    return LibvirtError(f"{what}: {msg}", object=obj, code=error_code(e))


def _call(what: str, obj: str | None, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except libvirt.libvirtError as e:
        raise _fail(e, what, obj) from None


# -- connection and domains --------------------------------------------------------------------------------


def connect(uri: str | None) -> libvirt.virConnect:
    """Open a read-write connection to libvirtd (*uri* None: libvirt's default, ``LIBVIRT_DEFAULT_URI``).

    Read-write because backupBegin, abortJob and checkpoint deletion need it; libvirt authorises the
    connection, not fleece.
    """
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise _fail(e, f"cannot connect to libvirt at {uri or 'the default URI'}", uri) from None


def domain(conn: libvirt.virConnect, name_or_uuid: str) -> libvirt.virDomain:
    """The domain called *name_or_uuid* (a name first, then a UUID). Unknown: UsageError naming the
    running domains, since a typo is the usual cause."""
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return lookup(name_or_uuid)
        except libvirt.libvirtError as e:
            if error_code(e) not in ("VIR_ERR_NO_DOMAIN", "VIR_ERR_INVALID_ARG"):
                raise _fail(e, f"cannot look up domain {name_or_uuid}", name_or_uuid) from None
    running = running_domains(conn)
    raise UsageError(f"no libvirt domain {name_or_uuid!r} on {conn.getURI()} (running: "
                     f"{', '.join(running) if running else 'none'})", object=name_or_uuid)


def running_domains(conn: libvirt.virConnect) -> list[str]:
    """Names of the running domains, sorted."""
    doms = _call("cannot list domains", None, lambda: conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    return sorted(d.name() for d in doms)


# -- disks -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtDisk:
    """One disk of the running domain, from its live XML.

    *target* (``vda``) is how libvirt names the disk everywhere (backup, checkpoint, export name).
    *device* is the QEMU device id (``virtio-disk0``, libvirt's ``<alias>``) and *node* the format node
    (``libvirt-2-format``), for matching query-block output; both None if libvirt did not say.
    """

    target: str
    path: str  # file or block device path; for network disks "protocol:name"
    format: str  # qcow2, raw … (only qcow2 disks can have checkpoints)
    bus: str  # virtio, scsi, sata, ide, usb …
    read_only: bool
    device: str | None
    node: str | None
    kind: str = "disk"  # libvirt's device='disk|lun|cdrom|floppy'


def live_xml(dom: libvirt.virDomain) -> ET.Element:
    """The domain's live XML (its disks, seclabels, channel states as libvirt sees them now)."""
    return ET.fromstring(_call("cannot read the domain XML", dom.name(), lambda: dom.XMLDesc(0)))


def disks(dom: libvirt.virDomain) -> list[VirtDisk]:
    """The domain's disks in XML order; cdroms and floppies without media (no ``<source>``) are left out."""
    root = live_xml(dom)
    out = []
    for d in root.iterfind("./devices/disk"):
        src, tgt = d.find("source"), d.find("target")
        if src is None or tgt is None:
            continue
        path = src.get("file") or src.get("dev") or src.get("volume")
        if path is None and src.get("protocol"):
            path = f"{src.get('protocol')}:{src.get('name', '')}"
        if path is None:
            continue
        drv, alias = d.find("driver"), d.find("alias")
        index = src.get("index")
        out.append(VirtDisk(target=tgt.get("dev", ""), path=path,
                            format=drv.get("type", "raw") if drv is not None else "raw",
                            bus=tgt.get("bus", ""), read_only=d.find("readonly") is not None,
                            device=alias.get("name") if alias is not None else None,
                            node=f"libvirt-{index}-format" if index else None, kind=d.get("device", "disk")))
    return out


_disks = disks  # begin_pull_backup's parameter is called disks


# -- checkpoints -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A libvirt checkpoint: per disk a persistent, recording QEMU bitmap of the same name (None for a
    disk the checkpoint left out with ``checkpoint='no'``)."""

    name: str
    parent: str | None
    created: int  # Unix time
    disks: dict[str, str | None] = field(default_factory=dict)


def _checkpoint(cp: libvirt.virDomainCheckpoint) -> Checkpoint:
    root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    parent = root.findtext("./parent/name")
    ds = {d.get("name", ""): (d.get("bitmap") if d.get("checkpoint") == "bitmap" else None)
          for d in root.iterfind("./disks/disk")}
    return Checkpoint(root.findtext("name", ""), parent, int(root.findtext("creationTime", "0")), ds)


def checkpoints(dom: libvirt.virDomain) -> list[Checkpoint]:
    """All checkpoints, parents before children (libvirt's topological order: oldest first on a chain).

    This is libvirt's metadata: after QEMU was killed (SIGKILL, host crash) a checkpoint can be listed
    while its bitmaps are missing or inconsistent; begin_pull_backup then fails with
    ``VIR_ERR_CHECKPOINT_INCONSISTENT``.
    """
    cps = _call("cannot list checkpoints", dom.name(),
                lambda: dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL))
    return [_call("cannot read a checkpoint", dom.name(), lambda c=c: _checkpoint(c)) for c in cps]


def checkpoint_disks(dom: libvirt.virDomain, name: str) -> dict[str, str]:
    """``{target: bitmap}`` of checkpoint *name*, for the disks it has a bitmap on."""
    cp = _call(f"no checkpoint {name}", name, lambda: dom.checkpointLookupByName(name))
    return {t: b for t, b in _checkpoint(cp).disks.items() if b}


def delete_checkpoint(dom: libvirt.virDomain, name: str, *, metadata_only: bool = False) -> bool:
    """Delete checkpoint *name*; False if there was none.

    libvirt 9.0 just removes the checkpoint's bitmap from every disk (one ``transaction`` of
    ``block-dirty-bitmap-remove``): nothing is merged, and nothing needs to be, because every checkpoint
    bitmap records on its own — an incremental from an older checkpoint still sees every change, and the
    children's bitmaps are unaffected. Deleting the root or a middle checkpoint re-parents its children.
    When a bitmap is already gone (QEMU was killed), libvirt refuses (``VIR_ERR_INTERNAL_ERROR``
    "bitmap … not found"); *metadata_only* then drops just libvirt's record (an inconsistent bitmap, if
    any, stays in the qcow2 and can only be removed over QMP).
    """
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError as e:
        if error_code(e) == "VIR_ERR_NO_DOMAIN_CHECKPOINT":
            return False
        raise _fail(e, f"cannot look up checkpoint {name}", name) from None
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    _call(f"cannot delete checkpoint {name}", name, lambda: cp.delete(flags))
    return True


# -- pull backup -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedDisk:
    """One disk of a running pull backup: read *export* from the job's socket; for an incremental disk
    *bitmap* is the NBD meta context's bitmap (``qemu:dirty-bitmap:`` + bitmap) = changed since
    *incremental_from*."""

    target: str
    export: str
    mode: Literal["full", "incremental"]
    bitmap: str | None
    incremental_from: str | None
    scratch: str | None

    @property
    def meta_context(self) -> str | None:
        return f"qemu:dirty-bitmap:{self.bitmap}" if self.bitmap else None


@dataclass(frozen=True)
class BackupJob:
    """A pull backup job as libvirt reports it (``virDomainBackupGetXMLDesc``)."""

    socket: str | None  # unix socket of the NBD server (None: TCP, see *xml*)
    disks: dict[str, ExportedDisk]
    xml: str
    checkpoint: str | None = None  # the checkpoint begin_pull_backup created (libvirt does not report it)


def _parse_job(xml: str) -> BackupJob:
    root = ET.fromstring(xml)
    srv = root.find("server")
    sock = srv.get("socket") if srv is not None and srv.get("transport") == "unix" else None
    top_inc = root.findtext("incremental")
    out = {}
    for d in root.iterfind("./disks/disk"):
        if d.get("backup") == "no":
            continue
        t = d.get("name", "")
        inc = d.get("incremental") or top_inc
        mode = d.get("backupmode") or ("incremental" if inc else "full")
        s = d.find("scratch")
        out[t] = ExportedDisk(target=t, export=d.get("exportname") or t,
                              mode="incremental" if mode == "incremental" else "full",
                              bitmap=d.get("exportbitmap") if mode == "incremental" else None,
                              incremental_from=inc if mode == "incremental" else None,
                              scratch=(s.get("file") or s.get("dev")) if s is not None else None)
    return BackupJob(sock, out, xml)


def _since(incremental_from: str | dict[str, str] | None, target: str) -> str | None:
    return incremental_from.get(target) if isinstance(incremental_from, dict) else incremental_from


def backup_xml(socket_path: str, scratch_dir: str, disks: dict[str, Mode],
               incremental_from: str | dict[str, str] | None, all_targets: list[str]) -> str:
    """The ``<domainbackup mode='pull'>`` document: per-disk ``backupmode``/``incremental`` (so one job can
    mix full and incremental disks, each incremental from its own checkpoint; libvirt 9.0 accepts these
    attributes), every other disk ``backup='no'``, scratch files ``DIR/<target>.scratch``.
    *incremental_from*: one checkpoint for every incremental disk, or ``{target: checkpoint}``."""
    parts = []
    for t in all_targets:
        mode = disks.get(t, "skip")
        if mode == "skip":
            parts.append(f"<disk name={quoteattr(t)} backup='no'/>")
            continue
        attrs = "backupmode='full'" if mode == "full" else \
            f"backupmode='incremental' incremental={quoteattr(_since(incremental_from, t) or '')}"
        scratch = os.path.join(scratch_dir, f"{t}.scratch")
        parts.append(f"<disk name={quoteattr(t)} backup='yes' type='file' {attrs}>"
                     f"<driver type='qcow2'/><scratch file={quoteattr(scratch)}/></disk>")
    return (f"<domainbackup mode='pull'><server transport='unix' socket={quoteattr(socket_path)}/>"
            f"<disks>{''.join(parts)}</disks></domainbackup>")


def checkpoint_xml(name: str, disks: dict[str, Mode], all_targets: list[str],
                   bitmaps: Iterable[str] | None = None) -> str:
    """A checkpoint with a bitmap on every disk backed up now (or only on *bitmaps*: a raw disk cannot
    hold one) and none on the others: without an explicit ``<disks>`` libvirt puts a bitmap on *every*
    qcow2 disk, skipped ones too."""
    marked = {t for t in all_targets if disks.get(t, "skip") != "skip"} if bitmaps is None else set(bitmaps)
    ds = "".join(f"<disk name={quoteattr(t)} checkpoint='{'bitmap' if t in marked else 'no'}'/>"
                 for t in all_targets)
    return f"<domaincheckpoint><name>{escape(name)}</name><disks>{ds}</disks></domaincheckpoint>"


def begin_pull_backup(dom: libvirt.virDomain, socket_path: str, scratch_dir: str, disks: dict[str, Mode],
                      incremental_from: str | dict[str, str] | None, new_checkpoint: str | None,
                      checkpoint_disks: Iterable[str] | None = None) -> BackupJob:
    """Start a pull backup of *disks* (``{target: "full"|"incremental"|"skip"}``; targets not named are
    skipped) and, at the same instant, checkpoint *new_checkpoint* (None: no checkpoint) with a bitmap on
    *checkpoint_disks* (default: every disk backed up). *incremental_from*: the checkpoint every
    incremental disk starts from, or one per disk (``{target: checkpoint}``).

    *socket_path*: the NBD server's unix socket. libvirt lets QEMU create it there (mode 0775 under QEMU's
    umask), so put it in a directory only fleece can enter (0700). *scratch_dir*: libvirt creates
    ``<target>.scratch`` there (qcow2, 0600, backing = the disk) and deletes it when the job ends; a file
    of that name must not exist (``VIR_ERR_INVALID_ARG`` "store … exists"). Both paths must be visible to
    libvirtd (same mount namespace) and short enough for a unix socket (< 108 bytes).

    Checkpoint names: ``[a-zA-Z0-9_-][a-zA-Z0-9_.-]*`` (libvirt's schema; no '/', ':', space or leading '.').
    The checkpoint stays even if the backup is aborted (it exists from the start); delete it on failure if
    it must not become the parent of the next incremental.
    """
    targets = [d.target for d in _disks(dom)]
    unknown = sorted(set(disks) - set(targets))
    if unknown:
        raise UsageError(f"{dom.name()} has no disk {', '.join(unknown)} (disks: {', '.join(targets)})",
                         object=unknown[0])
    if any(m == "incremental" and not _since(incremental_from, t) for t, m in disks.items()):
        raise UsageError("an incremental disk needs the checkpoint to start from", object=dom.name())
    if not any(m in ("full", "incremental") for m in disks.values()):
        raise UsageError(f"nothing to back up on {dom.name()}", object=dom.name())
    bx = backup_xml(socket_path, scratch_dir, disks, incremental_from, targets)
    cx = checkpoint_xml(new_checkpoint, disks, targets, checkpoint_disks) if new_checkpoint else None
    _call(f"libvirt refused to start the backup of {dom.name()}", dom.name(), lambda: dom.backupBegin(bx, cx, 0))
    job = active_backup(dom)
    if job is None:  # begun and already gone: the domain stopped in between
        raise LibvirtError(f"the backup job of {dom.name()} ended as soon as it started", object=dom.name(),
                           code="VIR_ERR_NO_DOMAIN_BACKUP")
    return BackupJob(job.socket, job.disks, job.xml, new_checkpoint)


def active_backup(dom: libvirt.virDomain) -> BackupJob | None:
    """The domain's running backup job (any client's: it outlives the process that began it), or None.

    A job left by a killed fleece is recognisable by its socket path (fleece's own run directory).
    """
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as e:
        if error_code(e) in ("VIR_ERR_NO_DOMAIN_BACKUP", "VIR_ERR_OPERATION_INVALID"):  # no job / not running
            return None
        raise _fail(e, f"cannot query the backup job of {dom.name()}", dom.name()) from None
    return _parse_job(xml)


def end_backup(dom: libvirt.virDomain, timeout: float = 30.0) -> bool:
    """End the domain's pull backup job (libvirt has no "finish" for pull mode: abort is the end); return
    False if none was running. Idempotent.

    ``abortJob`` returns at once (~5 ms); the teardown (block-job-cancel, nbd-server-stop — which drops
    connected NBD clients — blockdev-del, scratch deletion) follows asynchronously, so this waits until
    libvirt no longer reports the job (measured 5–35 ms). abortJob ends *any* async job, so only a
    backup job is aborted.
    """
    if active_backup(dom) is None:
        return False
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        if error_code(e) != "VIR_ERR_OPERATION_INVALID":  # "no job is active": ended meanwhile
            raise _fail(e, f"cannot end the backup job of {dom.name()}", dom.name()) from None
    deadline = time.monotonic() + timeout
    while active_backup(dom) is not None:
        if time.monotonic() > deadline:
            raise LibvirtError(f"the backup job of {dom.name()} did not end within {timeout:.0f} s",
                               object=dom.name(), code="VIR_ERR_OPERATION_TIMEOUT")
        time.sleep(0.005)
    return True


# -- guest agent -------------------------------------------------------------------------------------------


def qemu_owner(dom: libvirt.virDomain) -> tuple[int, int] | None:
    """The uid and gid libvirt runs the domain's QEMU as: the DAC ``<seclabel>`` of the live XML
    (``+64055:+64055``, or ``user:group`` names), or None if the XML has none (QEMU runs as libvirtd)."""
    import grp
    import pwd

    root = live_xml(dom)
    for sec in root.iterfind("./seclabel"):
        label = sec.findtext("label")
        if sec.get("model") != "dac" or not label or ":" not in label:
            continue
        user, group = label.split(":", 1)
        try:
            uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
            gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            raise LibvirtError(f"domain {dom.name()} runs QEMU as {label!r}, which this host cannot resolve",
                               object=dom.name()) from None
        return uid, gid
    return None


AGENT_CHANNEL = "org.qemu.guest_agent.0"


def agent_state(dom: libvirt.virDomain) -> str | None:
    """The guest agent channel's state in the live XML: ``connected`` (an agent opened the port in the
    guest), ``disconnected``, or None (the domain has no agent channel). libvirt answers a freeze with
    VIR_ERR_AGENT_UNRESPONSIVE both for "no agent connected" and "the agent timed out"; only the second
    can leave the guest frozen, and this tells them apart without reading messages."""
    root = live_xml(dom)
    for t in root.iterfind("./devices/channel/target"):
        if t.get("name") == AGENT_CHANNEL:
            return t.get("state") or "disconnected"
    return None


def agent_timeout(dom: libvirt.virDomain, seconds: int | None) -> None:
    """Bound every agent call on this domain by *seconds* (libvirt's per-domain agent response timeout,
    kept in the domain's status across libvirtd restarts); None: back to what a domain starts with, block
    (libvirt's "default", -1, would be 5 s for every tool). libvirt has no call to read the current value."""
    value = libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_BLOCK if seconds is None else int(seconds)
    _call(f"cannot set the guest agent timeout of {dom.name()}", dom.name(),
          lambda: dom.agentSetResponseTimeout(value, 0))


def fs_frozen(dom: libvirt.virDomain, timeout: int) -> bool | None:
    """Whether the guest agent says the filesystems are frozen now (``guest-fsfreeze-status`` through
    libvirt-qemu's agent pass-through); None if that cannot be asked. Needed because libvirt reports the
    agent refusing a freeze (someone else's holds: not ours to thaw) and the agent dying mid-freeze (may be
    ours) with the same VIR_ERR_INTERNAL_ERROR. libvirt marks the domain tainted "custom-ga-command" once."""
    try:
        import libvirt_qemu
    except ImportError:
        return None
    try:
        doc = json.loads(libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-status"}', int(timeout), 0))
    except (libvirt.libvirtError, ValueError):
        return None
    ret = doc.get("return") if isinstance(doc, dict) else None
    return {"frozen": True, "thawed": False}.get(ret) if isinstance(ret, str) else None


def fs_freeze(dom: libvirt.virDomain) -> int:
    """Freeze the guest's filesystems through qemu-guest-agent; return how many were frozen (bounded by
    :func:`agent_timeout`, else libvirt blocks). No agent channel in the domain XML:
    ``VIR_ERR_ARGUMENT_UNSUPPORTED``; channel but no agent answering: ``VIR_ERR_AGENT_UNRESPONSIVE`` (both at
    once, measured). libvirt 9.0 has no quiesce for checkpoints (``VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE`` is
    rejected by the QEMU driver), so freeze → begin_pull_backup → thaw is the way.
    """
    return _call(f"cannot freeze the filesystems of {dom.name()}", dom.name(), lambda: dom.fsFreeze(None, 0))


def fs_thaw(dom: libvirt.virDomain) -> int:
    """Thaw what :func:`fs_freeze` froze; return how many filesystems were thawed."""
    return _call(f"cannot thaw the filesystems of {dom.name()}", dom.name(), lambda: dom.fsThaw(None, 0))
