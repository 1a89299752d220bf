"""What the VM looks like: its name, run state and disks, from ``query-name``/``query-status``/``query-block``.

A disk is named by the ``id=`` of its guest device (``query-block`` reports it inside the ``qdev`` path,
``/machine/peripheral/<id>/…``): that id is stable across restarts and is what users pass to ``--disk``.
Only a device without an id falls back to the name of its block node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .qmp import Monitor

_PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)(?:/.*)?$")


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
    qdev: str
    node: str  # the block node the device is attached to (where bitmaps live)
    driver: str  # qcow2, raw, ... of that node
    virtual_size: int
    filename: str
    read_only: bool
    cluster_size: int | None = None
    compat: str | None = None
    bitmaps: list[Bitmap] = field(default_factory=list)

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


@dataclass
class VmInfo:
    name: str
    status: str
    disks: list[DiskInfo]

    @property
    def running(self) -> bool:
        return self.status == "running"


def disk_id(qdev: str, node: str) -> str:
    m = _PERIPHERAL.match(qdev or "")
    return m.group(1) if m else node


def inspect(mon: Monitor) -> VmInfo:
    """Read the VM's name, status and every disk with a medium (CD-ROM trays etc. are skipped)."""
    name = mon.cmd("query-name").get("name") or ""
    status = mon.cmd("query-status")["status"]
    disks = []
    for dev in mon.cmd("query-block"):
        ins = dev.get("inserted")
        if not ins:
            continue
        image = ins.get("image", {})
        spec = image.get("format-specific", {}) or {}
        node = ins.get("node-name", "")
        qdev = dev.get("qdev", "")
        disks.append(DiskInfo(
            id=disk_id(qdev, node or dev.get("device", "")),
            qdev=qdev,
            node=node,
            driver=ins.get("drv", ""),
            virtual_size=int(image.get("virtual-size", 0)),
            filename=ins.get("file", ""),
            read_only=bool(ins.get("ro", False)),
            cluster_size=image.get("cluster-size"),
            compat=(spec.get("data") or {}).get("compat") if spec.get("type") == "qcow2" else None,
            bitmaps=[Bitmap.from_qmp(b) for b in ins.get("dirty-bitmaps", []) if "name" in b],
        ))
    return VmInfo(name=name, status=status, disks=disks)
