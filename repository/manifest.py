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

A *merged* layer (``fleece forget`` turning a point whose older layers go into a self-contained full,
``repository.merge``) references parts of blobs: a newer layer had overwritten the rest. Its map has a
fourth column, ``skip:u32`` (where the entry's bytes start inside the blob's plaintext; bit 31 set:
the entry covers only part of its blob, even when its skip is 0), flagged by ``"extent_layout": 2`` in
the disk record; a manifest holding such a map has ``format`` 2, so that a fleece that predates it
refuses the point instead of restoring the wrong bytes.
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
#: manifests with a merged layer whose map has a skip column (see the module docstring)
FORMAT_SKIPS = 2
FORMATS = (FORMAT, FORMAT_SKIPS)
ZERO_REF = 0xFFFFFFFF
_ENTRY = struct.Struct("<QQI")
_ENTRY2 = struct.Struct("<QQII")
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


MAX_NOTE = 1000


def check_tag(tag: str) -> str:
    """A point's tag: a short printable word (``forget --keep-tag`` matches it exactly)."""
    if not tag or len(tag) > 100 or any(not ch.isprintable() or ch.isspace() or ch == "," for ch in tag):
        raise UsageError(f"tag {tag!r} cannot be used: tags are 1-100 printable characters without spaces or commas")
    return tag


def check_note(note: str) -> str:
    if len(note) > MAX_NOTE or any(not ch.isprintable() for ch in note):
        raise UsageError(f"a note is at most {MAX_NOTE} printable characters on one line")
    return note


def annotation_fields(tags: list[str], note: str | None, protected: bool = False) -> dict[str, Any]:
    """The manifest ``extra`` fields of a point's tags, note and protection (absent when unset)."""
    out: dict[str, Any] = {}
    if tags:
        out["tags"] = sorted({check_tag(t) for t in tags})
    if note:
        out["note"] = check_note(note)
    if protected:
        out["protected"] = True
    return out


PART_FLAG = 0x80000000


def encode_extents(extents: list[Extent], skips: dict[int, int] | None = None, parts: set[int] | None = None) -> str:
    """Binary, compressed, base64 form of an extent map (see module docstring); with *skips* (entry
    offset → where its bytes start inside its blob) or *parts* (offsets of entries covering part of
    their blob) the four-column layout."""
    parts = parts or set()
    wide = bool(skips or parts)
    skips = skips or {}
    ids: dict[bytes, int] = {}
    rows = []
    for off, length, blob in extents:
        if blob is None:
            ref = ZERO_REF
        else:
            ref = ids.setdefault(blob, len(ids))
        rows.append(_ENTRY2.pack(off, length, ref, skips.get(off, 0) | (PART_FLAG if off in parts else 0)) if wide
                    else _ENTRY.pack(off, length, ref))
    body = _COUNT.pack(len(ids)) + b"".join(ids) + b"".join(rows)
    return base64.b64encode(zstandard.ZstdCompressor(level=9).compress(body)).decode()


def decode_extents(text: str, where: str, layout: int = 1) -> tuple[list[Extent], dict[int, int], set[int]]:
    """An extent map, its skips and its partial entries (both empty for the three-column layout 1)."""
    entry = _ENTRY2 if layout == 2 else _ENTRY
    try:
        if layout not in (1, 2):
            raise ValueError(f"unknown extent layout {layout!r}")
        body = zstandard.ZstdDecompressor().decompress(base64.b64decode(text, validate=True))
        (nids,) = _COUNT.unpack_from(body, 0)
        pos = _COUNT.size
        ids = [body[pos + 32 * i: pos + 32 * (i + 1)] for i in range(nids)]
        pos += 32 * nids
        if (len(body) - pos) % entry.size:
            raise ValueError("ragged entry table")
        out: list[Extent] = []
        skips: dict[int, int] = {}
        parts: set[int] = set()
        for row in entry.iter_unpack(body[pos:]):
            off, length, ref = row[0], row[1], row[2]
            if ref != ZERO_REF and ref >= nids:
                raise ValueError(f"entry at {off} names blob {ref} of {nids}")
            out.append((off, length, None if ref == ZERO_REF else ids[ref]))
            if layout == 2 and row[3]:
                if ref == ZERO_REF:
                    raise ValueError(f"ZERO entry at {off} has a skip")
                if row[3] & ~PART_FLAG:
                    skips[off] = row[3] & ~PART_FLAG
                if row[3] & PART_FLAG:
                    parts.add(off)
    except (ValueError, IndexError, struct.error, zstandard.ZstdError, TypeError) as exc:
        raise IntegrityError(f"{where}: extent map is damaged ({exc})") from None
    return out, skips, parts


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
    #: entry offset → where the entry's bytes start inside its blob (merged layers only; see the docstring)
    skips: dict[int, int] = field(default_factory=dict)
    #: offsets of entries that cover only part of their blob (merged layers: a newer layer overwrote the
    #: rest). Every other entry is its whole blob — what the bitmap audit compares by id alone.
    parts: set[int] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        obj = {"kind": self.kind, "virtual_size": self.virtual_size, "granularity": self.granularity,
               "qcow2": self.qcow2, "bitmap": self.bitmap, "stats": self.stats,
               "extent_count": len(self.extents), "extents": encode_extents(self.extents, self.skips, self.parts)}
        if self.skips or self.parts:
            obj["extent_layout"] = 2
        if self.parent is not None:
            obj["parent"] = self.parent
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> DiskRecord:
        extents, skips, parts = decode_extents(obj["extents"], where, obj.get("extent_layout", 1))
        if len(extents) != obj.get("extent_count", len(extents)):
            raise IntegrityError(f"{where}: extent map has {len(extents)} entries, expected {obj['extent_count']}")
        return cls(kind=obj["kind"], virtual_size=obj["virtual_size"], extents=extents,
                   granularity=obj.get("granularity", 65536), qcow2=obj.get("qcow2", {}),
                   bitmap=obj.get("bitmap"), stats=obj.get("stats", {}), parent=obj.get("parent"), skips=skips,
                   parts=parts)


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
        body = {"format": FORMAT_SKIPS if any(d.skips or d.parts for d in self.disks.values()) else FORMAT, "id": self.id, "vm": self.vm, "created": self.created, "parent": self.parent,
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
        if body.get("format") not in FORMATS:
            raise IntegrityError(f"{where} has manifest format {body.get('format')!r}; this fleece reads "
                                 f"formats {', '.join(map(str, FORMATS))}: upgrade fleece")
        try:
            disks = {name: DiskRecord.from_json(d, f"{where} disk {name}") for name, d in body["disks"].items()}
            return cls(id=body["id"], vm=body["vm"], created=body["created"], parent=body["parent"],
                       kind=body["kind"], disks=disks, consistency=body.get("consistency", "crash"),
                       tool=body.get("tool", ""), extra=body.get("extra", {}))
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{where} lacks field {exc}") from None

    @property
    def index_hints(self) -> list[str]:
        """Index objects that locate this point's blobs without the whole index: its run's own, and
        those of the points a forget merged into it (``extra.index``; a hint may have been consolidated
        away by a prune — readers fall back to searching every index object)."""
        hints = self.extra.get("index")
        return [h for h in hints if isinstance(h, str)] if isinstance(hints, list) else []

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
                "tags": list(self.extra.get("tags") or []), "note": self.extra.get("note"),
                "protected": bool(self.extra.get("protected")),
                "disks": {name: {"kind": d.kind, "virtual_size": d.virtual_size, "parent": self.disk_parent(name),
                                 **d.stats}
                          for name, d in self.disks.items()}}
