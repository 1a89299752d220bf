"""Which machine a VM's history belongs to, so that two machines never share one silently (DESIGN §5).

A VM's points are stored under a name (``-name`` or ``--vm``), and names collide: two hosts each run a
``web1``, a template is cloned without a new name. Mixed into one history, every run of either would be
a full with a false reason and ``restore --vm web1`` would return whichever ran last. So every point
records the identity of the machine it came from, and a backup refuses to add a point to a history that
belongs to another machine.

Identity, strongest first:

* QEMU's ``-uuid`` (``query-uuid``; libvirt always sets one): two machines are the same iff their UUIDs are.
* Without a UUID on both sides: the same host, and every writable disk both know (by disk id) is the
  same disk — its backing chains share an image file (absolute paths; a relative ``-drive file=`` is
  resolved against QEMU's working directory). Read-only media (an installer ISO two VMs both have)
  never count, and a shared ``share-rw`` disk cannot make two machines one: their other disks differ.
  A restart, a ``-drive`` → ``-blockdev`` change, an added or removed disk and an external snapshot
  (the old image becomes the backing file) keep the history; disks whose images traded places do not
  (``--adopt``, once). With no disk id in common, one shared image file is enough.

A machine that really is the same but changed all of that at once (restored onto a new host after a
disaster, disks renamed) continues its history with ``--adopt``; its first backup is then a full anyway,
as its bitmaps are gone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from fleece.repository.errors import FleeceError, IdentityError

from .inventory import VmInfo
from .qmp import Monitor

NO_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass
class Machine:
    uuid: str | None
    host: str
    images: dict[str, list[str]] = field(default_factory=dict)  # disk id -> image files of its chain, top first

    @classmethod
    def of(cls, mon: Monitor, info: VmInfo) -> Machine:
        try:
            uuid = str(mon.cmd("query-uuid").get("UUID") or "") or None
        except FleeceError:
            uuid = None
        if uuid == NO_UUID:
            uuid = None
        return cls(uuid=uuid, host=socket.gethostname(),
                   images={d.id: [_absolute(name, mon.peer_pid) for name in (d.chain or [d.filename])]
                           for d in info.disks if d.filename and not d.read_only and d.attached})

    @classmethod
    def from_json(cls, obj: Any) -> Machine | None:
        if not isinstance(obj, dict) or "host" not in obj:
            return None
        images = {d: [files] if isinstance(files, str) else list(files)
                  for d, files in (obj.get("images") or {}).items()}
        return cls(uuid=obj.get("uuid"), host=str(obj["host"]), images=images)

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "host": self.host, "images": self.images}

    def same_as(self, other: Machine) -> bool:
        if self.uuid and other.uuid:
            return self.uuid == other.uuid
        if self.host != other.host:
            return False
        common = self.images.keys() & other.images.keys()
        if common:  # every disk both know must be the same disk: its chains share a file
            return all(set(self.images[d]) & set(other.images[d]) for d in common)
        return bool({f for fs in self.images.values() for f in fs} & {f for fs in other.images.values() for f in fs})

    def describe(self) -> str:
        if self.uuid:
            return f"uuid {self.uuid} on host {self.host}"
        files = ", ".join(f"{d}={fs[0]}" for d, fs in sorted(self.images.items()) if fs) or "no disk files"
        return f"host {self.host}, disks {files}"


def _absolute(filename: str, qemu_pid: int | None) -> str:
    """The image file as an absolute path: QEMU reports a relative ``-drive file=`` as given, relative
    to *its* working directory (two VMs in two directories may both say ``disk.qcow2``)."""
    if filename.startswith("/") or ":" in filename.split("/", 1)[0]:  # absolute, or a protocol (nbd:, …)
        return os.path.realpath(filename) if filename.startswith("/") else filename
    if qemu_pid:
        try:
            return os.path.realpath(os.path.join(os.readlink(f"/proc/{qemu_pid}/cwd"), filename))
        except OSError:
            pass
    return f"?/{filename}"  # unknown directory: matches nothing but the same unknown name


def check_history(vm: str, here: Machine, recorded: Machine | None, last_point: str, adopt: bool) -> str | None:
    """Refuse a point for *vm* from *here* when its history belongs to *recorded*; returns a log line."""
    if recorded is None:
        return None  # points written before identities were recorded: this machine takes the history on
    if here.same_as(recorded):
        return None
    if adopt:
        return (f"--adopt: this machine ({here.describe()}) continues the history of VM {vm!r}, "
                f"last backed up from {recorded.describe()}")
    raise IdentityError(
        f"VM name {vm!r} in this repository belongs to another machine ({recorded.describe()}; last point "
        f"{last_point}); this QEMU is {here.describe()}. Back this VM up under its own name with --vm NAME, "
        "or, if it is the same machine moved to a new host or given new disks, pass --adopt to continue "
        "that history")
