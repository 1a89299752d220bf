"""What the VM looks like: its name, run state and disks, from ``query-name``/``query-status``/``query-block``.

A disk is named by the ``id=`` of its guest device: that id is stable across restarts and is what users pass
to ``--disk``. ``query-block`` reports the device that owns the disk's BlockBackend as ``qdev``, in one of
two forms (QEMU's ``blk_get_attached_dev_id``: the device's id if it has one, else its canonical QOM path),
verified on 7.2 for every bus:

=====================================  =============================================  ========================
device                                 ``qdev``                                       disk id
=====================================  =============================================  ========================
``virtio-blk-pci,id=vda``              ``/machine/peripheral/vda/virtio-backend``     ``vda``
``scsi-hd,id=sda`` (virtio-scsi)       ``sda``                                        ``sda``
``ide-hd,id=sata0`` (q35 ahci)         ``sata0``                                      ``sata0``
``nvme,drive=…,id=nvme0``              ``nvme0``                                      ``nvme0``
``nvme-ns,id=ns1`` (on ``nvme``)       ``ns1``                                        ``ns1``
``usb-storage,id=usb0``                ``/machine/peripheral/usb0/usb0.0/legacy[0]``  ``usb0``
``-drive if=virtio`` (no device id)    ``/machine/peripheral-anon/device[2]/…``       drive ``virtio0``
``-drive if=ide`` (no device id)       ``/machine/unattached/device[16]``             drive ``ide0-hd0``
=====================================  =============================================  ========================

(virtio-blk's BlockBackend hangs off the id-less ``virtio-backend`` child, usb-storage's off the internal
``scsi-hd`` it creates: hence the long forms.) A device without an id falls back, in this order, to the
name of its ``-drive`` (query-block ``device``: the ``id=`` or ``virtio0``/``ide0-hd0``/… derived from
bus and unit, stable for a given command line), a user-given node name (``-blockdev node-name=``), the
anonymous device's QOM path, and only then to an auto-generated node name (``#block123``), which changes
on every QEMU start — every backup after a restart would be a full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleece.repository.errors import QemuError

from .qmp import Monitor

_PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)(?:/.*)?$")
# QEMU's own rule for ids and user-given node names (id_wellformed); auto-generated node names start with '#'.
_WELLFORMED = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")


@dataclass
class Bitmap:
    name: str
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, obj: dict[str, Any]) -> Bitmap:
        return cls(name=obj["name"], recording=obj.get("recording", False), persistent=obj.get("persistent", False),
                   busy=obj.get("busy", False), inconsistent=obj.get("inconsistent", False),
                   granularity=obj.get("granularity", 65536), count=obj.get("count", 0))


@dataclass
class DiskInfo:
    """One guest disk as QEMU sees it now."""

    id: str
    qdev: str  # as query-block reports it: a bare device id or a canonical QOM path (see qom_path)
    node: str  # the block node the device is attached to (where bitmaps live)
    driver: str  # qcow2, raw, ... of that node
    virtual_size: int
    filename: str
    read_only: bool
    cluster_size: int | None = None
    compat: str | None = None
    bitmaps: list[Bitmap] = field(default_factory=list)
    #: the image files of the disk's backing chain, top first (``query-block``'s nested ``backing-image``)
    chain: list[str] = field(default_factory=list)
    #: an image of a shut-off VM (``backup --image``): no guest device, and nothing writes it but fleece
    offline: bool = False

    @property
    def attached(self) -> bool:
        """Whether this disk is one the VM's guest can write: a device uses it, or it is a shut-off VM's image."""
        return bool(self.qdev) or self.offline

    @property
    def qom_path(self) -> str:
        """Where ``qom-set … drive`` reaches the device that owns this disk's BlockBackend."""
        return qom_path(self.qdev)

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    def qcow2_options(self) -> dict[str, Any]:
        """What restore needs to recreate a faithful image (cluster size and compat level)."""
        opts: dict[str, Any] = {}
        if self.cluster_size:
            opts["cluster_size"] = self.cluster_size
        if self.compat:
            opts["compat"] = self.compat
        return opts


SHUT_OFF = "shut off"  # VmInfo.status of a shut-off VM's images (qemu-storage-daemon)


@dataclass
class VmInfo:
    name: str
    status: str
    disks: list[DiskInfo]

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def offline(self) -> bool:
        return self.status == SHUT_OFF


def qom_path(qdev: str) -> str:
    """The absolute QOM path of the device ``query-block`` names in *qdev*.

    A bare id must be made absolute: ``qom-set`` resolves a relative path as a *partial* path anywhere in
    the QOM tree and fails when the name is ambiguous — an NVMe controller ``id=nvme0`` has a child bus
    named ``nvme0`` too, so ``qom-set nvme0`` answers "Device 'nvme0' not found" on 7.2. Devices with an id
    live in ``/machine/peripheral/<id>``.
    """
    if qdev and not qdev.startswith("/"):
        return f"/machine/peripheral/{qdev}"
    return qdev


def device_id(qdev: str) -> str | None:
    """The ``id=`` of the guest device in a ``query-block`` ``qdev``, or None for an anonymous device."""
    if qdev and not qdev.startswith("/"):
        return qdev
    m = _PERIPHERAL.match(qdev or "")
    return m.group(1) if m else None


def _path_slug(qdev: str) -> str | None:
    """``/machine/peripheral-anon/device[1]`` → ``peripheral-anon-device-1``: the anonymous device's place in
    the QOM tree, which stays the same as long as the command line does (unlike an auto node name)."""
    if not qdev.startswith("/machine/"):
        return None
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", qdev[len("/machine/"):]).strip("-")
    return slug if _WELLFORMED.match(slug) else None


def disk_id(qdev: str, node: str, drive: str = "") -> str:
    """The most stable name there is for a disk: device id > drive name > user node name > QOM path > node.

    *drive* is query-block's ``device`` (the ``-drive`` name; empty for ``-blockdev``).
    """
    for candidate in (device_id(qdev), drive, node, _path_slug(qdev or "")):
        if candidate and _WELLFORMED.match(candidate):
            return candidate
    return node or drive or qdev


def _unique_ids(devs: list[tuple[str, str, str]]) -> list[str]:
    """Disk ids for (qdev, node, drive) triples, unique within the VM.

    Device ids are unique among themselves, and so are drive and node names (QEMU keeps those two in one
    namespace), but a device id may equal another disk's drive name. Device ids win; a fallback name that
    clashes gets a ``drive-``/``node-`` prefix, which depends only on the VM's configuration, so it stays
    stable across restarts.
    """
    ids = [disk_id(*d) for d in devs]
    own = [device_id(qdev) == i for i, (qdev, _, _) in zip(ids, devs)]
    taken = {i for i, o in zip(ids, own) if o}
    out = []
    for i, o, (_, _, drive) in zip(ids, own, devs):
        if not o:
            prefix = "drive-" if i == drive else "node-"
            while i in taken:
                i = prefix + i
            taken.add(i)
        out.append(i)
    return out


def _chain(image: dict[str, Any]) -> list[str]:
    files: list[str] = []
    while image:
        if image.get("filename"):
            files.append(image["filename"])
        image = image.get("backing-image") or {}
    return files


def _disk(id_: str, qdev: str, ins: dict[str, Any], offline: bool = False) -> DiskInfo:
    """A disk from QEMU's ``BlockDeviceInfo`` (query-block's ``inserted``, or a query-named-block-nodes entry)."""
    image = ins.get("image", {})
    spec = image.get("format-specific", {}) or {}
    return DiskInfo(
        id=id_,
        qdev=qdev,
        node=ins.get("node-name", ""),
        driver=ins.get("drv", ""),
        virtual_size=int(image.get("virtual-size", 0)),
        filename=ins.get("file", ""),
        chain=_chain(image),
        read_only=bool(ins.get("ro", False)),
        cluster_size=image.get("cluster-size"),
        compat=(spec.get("data") or {}).get("compat") if spec.get("type") == "qcow2" else None,
        bitmaps=[Bitmap.from_qmp(b) for b in ins.get("dirty-bitmaps", []) if "name" in b],
        offline=offline,
    )


def inspect_images(mon: Monitor, nodes: dict[str, str]) -> VmInfo:
    """The disks of a shut-off VM opened in qemu-storage-daemon (``backup --image``): *nodes* maps each
    disk id to the format node it was opened as. qemu-storage-daemon has no guest, no devices, no run
    state and no name (no ``query-block`` BlockBackends, no ``query-status``), so everything comes from
    ``query-named-block-nodes`` — which reports the same ``BlockDeviceInfo`` (bitmaps included)."""
    by_node = {n.get("node-name"): n for n in mon.cmd("query-named-block-nodes", {"flat": True})}
    disks = []
    for id_, node in nodes.items():
        if node not in by_node:
            raise QemuError(f"qemu-storage-daemon lost block node {node} of image {id_}")
        disks.append(_disk(id_, "", by_node[node], offline=True))
    return VmInfo(name="", status=SHUT_OFF, disks=disks)


def inspect(mon: Monitor) -> VmInfo:
    """Read the VM's name, status and every disk with a medium (CD-ROM trays etc. are skipped)."""
    name = mon.cmd("query-name").get("name") or ""
    status = mon.cmd("query-status")["status"]
    disks = []
    devs = [dev for dev in mon.cmd("query-block") if dev.get("inserted")]
    ids = _unique_ids([(dev.get("qdev", ""), dev["inserted"].get("node-name", ""), dev.get("device", ""))
                       for dev in devs])
    for dev, id_ in zip(devs, ids):
        disks.append(_disk(id_, dev.get("qdev", ""), dev["inserted"]))
    return VmInfo(name=name, status=status, disks=disks)
