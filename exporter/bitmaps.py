"""Dirty-bitmap bookkeeping: which level a disk can have, and the commit protocol (DESIGN §5).

Each point of a chain owns one persistent bitmap per disk, named ``fleece-<repo id>-<point id>.<disk>``
(``<disk>``: 8 hex of the disk id's SHA-256); it tracks every write *since* that point, and the point's
manifest records its name. The disk token matters: with one name for all disks of a point, a disk whose
image was swapped with another's (two ``-drive`` options reordered) or whose id passed to another disk
found the other disk's bitmap and built an incremental on the wrong chain. Names written before the
token existed (no ``.<disk>``) are still recognised. A backup:

* at the freeze, in one transaction with the guest paused: adds the new point's bitmap and (for an
  incremental) disables the parent's bitmap, which is then exported frozen;
* on success — only after the manifest is committed — removes the parent's bitmap;
* on failure, Ctrl-C or SIGTERM — folds the new bitmap back into the old one and re-enables it, in one
  transaction: nothing the guest wrote is ever lost from tracking.

A run killed before it could do either leaves a disabled old bitmap next to an enabled new one;
:func:`recover` resolves such pairs the same way (commit if the manifest exists, fold back otherwise).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fleece.repository.manifest import KIND_FULL, KIND_INCREMENTAL, Manifest

from .inventory import Bitmap, DiskInfo
from .qmp import Monitor

log = logging.getLogger(__name__)

#: Every name fleece gives a QEMU object (bitmaps here; nodes, exports, scratch files in graph.py) starts
#: with this, so a later run recognises what a killed one left behind — defined once, here.
PREFIX = "fleece-"


def repo_prefix(repo_id: str) -> str:
    return f"{PREFIX}{repo_id[:12]}-"


def disk_token(disk_id: str) -> str:
    return hashlib.sha256(disk_id.encode()).hexdigest()[:8]


def bitmap_name(repo_id: str, point_id: str, disk_id: str) -> str:
    return f"{repo_prefix(repo_id)}{point_id}.{disk_token(disk_id)}"


def point_of(name: str) -> str | None:
    """The point id a fleece bitmap name carries (``fleece-<12 hex>-<point id>[.<disk token>]``)."""
    parts = name.split("-", 2)
    if len(parts) == 3 and f"{parts[0]}-" == PREFIX and len(parts[1]) == 12:
        return parts[2].rsplit(".", 1)[0] if parts[2].count(".") > 1 else parts[2]
    return None


@dataclass
class Level:
    """What one disk gets this run, and why."""

    kind: str  # full | incremental
    old_bitmap: str | None  # the parent's bitmap: exported (incremental) or dropped after commit (full)
    reason: str
    remove_first: list[str]  # unusable bitmaps to drop before starting (inconsistent ones)
    track: bool = True  # give the new point a bitmap (only qcow2 can store persistent ones)
    since: str | None = None  # incremental: the point whose layer this one builds on


def choose_level(disk: DiskInfo, parent: Manifest | None, force_full: bool) -> Level:
    """``auto`` level: incremental only when the chain's bitmap is present and trustworthy.

    *force_full* is ``--full`` for this disk (the caller resolves ``--full`` alone vs ``--full ID``).

    *parent* is the newest point that holds this disk — not necessarily the VM's newest point, which
    may be a backup of other disks only (``--disk``) that left this disk's bitmap alone.
    """
    record = parent.disks.get(disk.id) if parent else None
    name = record.bitmap if record else None
    bitmap = disk.bitmap(name) if name else None
    # No bitmap at all where QEMU cannot store a persistent one: a raw image has no room for it, and a
    # read-only node accepts ``block-dirty-bitmap-add persistent`` but loses the bitmap at shutdown
    # ("Lost persistent bitmaps … No write access"). Such a disk is a full every time; the others of the
    # same point stay incremental.
    if disk.driver != "qcow2":
        return Level(KIND_FULL, None, f"a {disk.driver} image cannot hold a persistent dirty bitmap: every backup "
                                      "of it is a full", [], track=False)
    if disk.read_only:
        return Level(KIND_FULL, None, "read-only: QEMU cannot store a persistent dirty bitmap in it, so it gets "
                                      "none and every backup of it is a full", [], track=False)
    if parent is None:
        return Level(KIND_FULL, None, f"no earlier point of this VM holds disk {disk.id}", [])
    if record is None:
        return Level(KIND_FULL, None, f"disk {disk.id} is not in the last point {parent.id}", [])
    if bitmap is None:
        return Level(KIND_FULL, None, f"bitmap {name} is gone (QEMU was restarted without a clean shutdown, "
                                      "or the bitmap was removed)", [])
    if name.startswith(PREFIX) and not name.endswith(f".{disk_token(disk.id)}"):
        # One name served every disk of a point before bitmaps carried a disk token: this bitmap cannot
        # prove it belongs to this disk (images swapped since, an id given to another disk). Once.
        return Level(KIND_FULL, name, f"bitmap {name} predates per-disk bitmap names and cannot prove it "
                                      f"tracks disk {disk.id}; one full (dedup keeps the upload small)", [])
    if bitmap.inconsistent:
        return Level(KIND_FULL, None, f"bitmap {name} is inconsistent (QEMU crashed while it was in use); "
                                      "it is removed", [bitmap.name])
    if force_full:
        return Level(KIND_FULL, name, "--full requested", [])
    if not bitmap.persistent or not bitmap.recording:
        return Level(KIND_FULL, None, f"bitmap {name} is not {'persistent' if not bitmap.persistent else 'recording'}; "
                                      "it is removed", [bitmap.name])
    if bitmap.busy:
        from fleece.repository.errors import BitmapError

        raise BitmapError(f"bitmap {name} on disk {disk.id} is in use by another block job; wait for it to finish")
    if record.virtual_size != disk.virtual_size:
        return Level(KIND_FULL, name, f"disk resized from {record.virtual_size} to {disk.virtual_size} bytes", [])
    return Level(KIND_INCREMENTAL, name, f"bitmap {name} tracks every change since point {parent.id}", [],
                 since=parent.id)


def freeze_actions(node: str, new: str, level: Level, granularity: int | None) -> list[dict]:
    """Transaction actions for the freeze: new bitmap on, old bitmap frozen (incremental only)."""
    if not level.track:
        return []
    add: dict = {"node": node, "name": new, "persistent": True}
    if granularity:
        add["granularity"] = granularity
    actions = [{"type": "block-dirty-bitmap-add", "data": add}]
    if level.kind == KIND_INCREMENTAL and level.old_bitmap:
        actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": level.old_bitmap}})
    return actions


def rollback_actions(node: str, new: str, level: Level) -> list[dict]:
    """Failure: fold the new bitmap back into the old one (incremental) or just drop it (full)."""
    if not level.track:
        return []
    if level.kind == KIND_INCREMENTAL and level.old_bitmap:
        return [
            {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": level.old_bitmap, "bitmaps": [new]}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": level.old_bitmap}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": new}},
        ]
    return [{"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": new}}]


def commit_actions(node: str, keep: str, bitmaps: list[Bitmap], prefix: str) -> list[dict]:
    """Success: drop every other bitmap of this repository on the disk (the parent's and stale ones)."""
    return [{"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": b.name}}
            for b in bitmaps if b.name.startswith(prefix) and b.name != keep and not b.busy]


def transaction(mon: Monitor, actions: list[dict]) -> None:
    if actions:
        mon.cmd("transaction", {"actions": actions})


def recover(mon: Monitor, disk: DiskInfo, repo_prefix_: str, committed: Callable[[str], bool]) -> list[str]:
    """Resolve what a killed run left in *disk*'s bitmaps; returns log lines of what was done.

    For each repository's group of fleece bitmaps: inconsistent ones are removed; a disabled bitmap next
    to a newer enabled one is a run that never finished — if that run's point was committed (only known
    for our own repository) the old one is dropped, otherwise the new one is folded back into it.
    """
    done: list[str] = []
    groups: dict[str, list[Bitmap]] = {}
    for b in disk.bitmaps:
        if point_of(b.name) is not None:
            groups.setdefault(b.name[: len(PREFIX) + 13], []).append(b)
    for prefix, group in groups.items():
        for b in group:
            if b.inconsistent:
                transaction(mon, [{"type": "block-dirty-bitmap-remove", "data": {"node": disk.node, "name": b.name}}])
                done.append(f"removed inconsistent bitmap {b.name} on {disk.id}")
        usable = [b for b in group if not b.inconsistent and not b.busy]
        disabled = sorted((b for b in usable if not b.recording), key=lambda b: b.name)
        enabled = sorted((b for b in usable if b.recording), key=lambda b: b.name)
        if not disabled:
            continue
        old = disabled[-1]
        newer = [b for b in enabled if b.name > old.name]
        if not newer:
            # Disabled with nothing tracking since: it missed writes and cannot be trusted any more.
            transaction(mon, [{"type": "block-dirty-bitmap-remove", "data": {"node": disk.node, "name": old.name}}])
            done.append(f"removed stale disabled bitmap {old.name} on {disk.id} (next backup of it is full)")
            continue
        new = newer[-1]
        new_point = point_of(new.name)
        if prefix == repo_prefix_ and new_point is not None and committed(new_point):
            transaction(mon, [{"type": "block-dirty-bitmap-remove", "data": {"node": disk.node, "name": old.name}}])
            done.append(f"point {new_point} was committed by an interrupted run: removed old bitmap {old.name} "
                        f"on {disk.id}")
        else:
            level = Level(KIND_INCREMENTAL, old.name, "recovery", [])
            transaction(mon, rollback_actions(disk.node, new.name, level))
            done.append(f"folded bitmap {new.name} of an interrupted run back into {old.name} on {disk.id}")
    return done
