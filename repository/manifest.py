"""Manifests: the commit record of one point in time of one VM.

A manifest is a JSON document ``{"manifest": {...}, "sha256": "<hex of the canonical body>"}`` written
with put-if-absent under ``points/<vm>/<point id>``. It exists only once every pack and index it relies
on is durable, so a reader trusts exactly the points whose manifest exists. The checksum turns any
garbling of the object into an :class:`IntegrityError` instead of a wrong restore.

Per disk it carries an *extent map*: sorted, non-overlapping ``(offset, length, blob id | ZERO)``
entries, stored as a zstd-compressed binary table in base64 so that a map of a 2 TiB disk stays small::

    nids:u32  ids[nids][32]  then entries of  offset:u64 length:u64 ref:u32   (ref 0xFFFFFFFF = ZERO)

In a *full*, unlisted ranges read as zero. In an *incremental*, unlisted ranges are unchanged since the
parent point, and ``ZERO`` entries are ranges the guest zeroed or discarded (they must mask older data).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .errors import IntegrityError, UsageError

FORMAT = 1
ZERO_REF = 0xFFFFFFFF
_ENTRY = struct.Struct("<QQI")
_COUNT = struct.Struct("<I")

# (offset, length, blob id or None for ZERO)
Extent = tuple[int, int, bytes | None]

KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"


def new_point_id(now: float | None = None) -> str:
    """A point id that sorts by creation time (UTC, milliseconds) and is unique across hosts."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d}Z-{secrets.token_hex(4)}"


MAX_VM_NAME = 200  # keeps points/<key>/<point id> well inside S3's 1024-byte keys even fully %-quoted


def check_vm_name(vm: str) -> str:
    """Refuse a VM name no repository can store, before any work is done with it."""
    if not vm or not vm.strip():
        raise UsageError("the VM name is empty: pass --vm NAME")
    if vm in (".", ".."):
        raise UsageError(f"{vm!r} cannot be a VM name (it names a directory): pass another --vm NAME")
    if len(vm) > MAX_VM_NAME:
        raise UsageError(f"the VM name is {len(vm)} characters long; at most {MAX_VM_NAME} fit: pass a shorter --vm NAME")
    if any(not ch.isprintable() for ch in vm):
        raise UsageError(f"the VM name {vm!r} holds control characters: pass a printable --vm NAME")
    return vm


def encode_extents(extents: list[Extent]) -> str:
    """Binary, compressed, base64 form of an extent map (see module docstring)."""
    ids: dict[bytes, int] = {}
    rows = []
    for off, length, blob in extents:
        if blob is None:
            ref = ZERO_REF
        else:
            ref = ids.setdefault(blob, len(ids))
        rows.append(_ENTRY.pack(off, length, ref))
    body = _COUNT.pack(len(ids)) + b"".join(ids) + b"".join(rows)
    return base64.b64encode(zstandard.ZstdCompressor(level=9).compress(body)).decode()


def decode_extents(text: str, where: str) -> list[Extent]:
    try:
        body = zstandard.ZstdDecompressor().decompress(base64.b64decode(text, validate=True))
        (nids,) = _COUNT.unpack_from(body, 0)
        pos = _COUNT.size
        ids = [body[pos + 32 * i: pos + 32 * (i + 1)] for i in range(nids)]
        pos += 32 * nids
        if (len(body) - pos) % _ENTRY.size:
            raise ValueError("ragged entry table")
        out: list[Extent] = []
        for off, length, ref in _ENTRY.iter_unpack(body[pos:]):
            out.append((off, length, None if ref == ZERO_REF else ids[ref]))
    except (ValueError, IndexError, struct.error, zstandard.ZstdError) as exc:
        raise IntegrityError(f"{where}: extent map is damaged ({exc})") from None
    return out


@dataclass
class DiskRecord:
    """One disk's part of a point: what it looked like and which bytes changed."""

    kind: str
    virtual_size: int
    extents: list[Extent]
    granularity: int = 65536
    qcow2: dict[str, Any] = field(default_factory=dict)
    bitmap: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # The point holding this disk's previous layer (incrementals only). A backup of some disks only
    # (``--disk``) leaves the others' layers in older points, so each disk names its own; manifests
    # written without it mean the point's parent.
    parent: str | None = None

    def to_json(self) -> dict[str, Any]:
        obj = {"kind": self.kind, "virtual_size": self.virtual_size, "granularity": self.granularity,
               "qcow2": self.qcow2, "bitmap": self.bitmap, "stats": self.stats,
               "extent_count": len(self.extents), "extents": encode_extents(self.extents)}
        if self.parent is not None:
            obj["parent"] = self.parent
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> DiskRecord:
        extents = decode_extents(obj["extents"], where)
        if len(extents) != obj.get("extent_count", len(extents)):
            raise IntegrityError(f"{where}: extent map has {len(extents)} entries, expected {obj['extent_count']}")
        return cls(kind=obj["kind"], virtual_size=obj["virtual_size"], extents=extents,
                   granularity=obj.get("granularity", 65536), qcow2=obj.get("qcow2", {}),
                   bitmap=obj.get("bitmap"), stats=obj.get("stats", {}), parent=obj.get("parent"))


@dataclass
class Manifest:
    """A point in time of one VM: all its disks, frozen at the same instant."""

    id: str
    vm: str
    created: str
    parent: str | None
    kind: str
    disks: dict[str, DiskRecord]
    consistency: str = "crash"
    tool: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "id": self.id, "vm": self.vm, "created": self.created, "parent": self.parent,
                "kind": self.kind, "consistency": self.consistency, "tool": self.tool, "extra": self.extra,
                "disks": {name: disk.to_json() for name, disk in self.disks.items()}}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        doc = {"manifest": body, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            body = doc["manifest"]
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            digest = doc["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{where} is not a readable manifest ({exc})") from None
        if hashlib.sha256(canonical.encode()).hexdigest() != digest:
            raise IntegrityError(f"{where} is garbled (checksum mismatch)")
        if body.get("format") != FORMAT:
            raise IntegrityError(f"{where} has manifest format {body.get('format')!r}; this fleece reads "
                                 f"format {FORMAT}: upgrade fleece")
        try:
            disks = {name: DiskRecord.from_json(d, f"{where} disk {name}") for name, d in body["disks"].items()}
            return cls(id=body["id"], vm=body["vm"], created=body["created"], parent=body["parent"],
                       kind=body["kind"], disks=disks, consistency=body.get("consistency", "crash"),
                       tool=body.get("tool", ""), extra=body.get("extra", {}))
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{where} lacks field {exc}") from None

    def disk_parent(self, disk: str) -> str | None:
        """The point holding the previous layer of *disk* (``None`` for a full)."""
        record = self.disks[disk]
        if record.kind == KIND_FULL:
            return None
        return record.parent or self.parent

    def summary(self) -> dict[str, Any]:
        """The ``fleece list --json`` view of this point. ``host``: the machine it was taken on (the
        backup's identity record, else the older plain ``extra.host``; ``None`` for points that have neither)."""
        machine = self.extra.get("machine")
        host = machine.get("host") if isinstance(machine, dict) else None
        host = host if host is not None else self.extra.get("host")
        return {"id": self.id, "vm": self.vm, "kind": self.kind, "parent": self.parent, "created": self.created,
                "consistency": self.consistency, "host": None if host is None else str(host),
                "disks": {name: {"kind": d.kind, "virtual_size": d.virtual_size, "parent": self.disk_parent(name),
                                 **d.stats}
                          for name, d in self.disks.items()}}
