"""Synthetic fulls: what ``forget`` rewrites so that every kept point stays restorable.

Blobs are content-addressed, so merging layers is a manifest operation (the repository's block-stream):
the resolved extent map of a chain — every byte from the newest layer that has it — *is* a full of the
same disk, referencing the same blobs, parts of some (``DiskRecord.skips``). Nothing is re-read from the
VM and no blob is copied.

:func:`plan_merges` decides, from a VM's manifests and the ids to forget, which kept points get which
disks merged. The rules, applied to kept points oldest first:

* a kept point whose own layer of a disk sits on a chain through a forgotten point gets that disk as a
  merged full (later kept points build on it and now stop there);
* a kept point whose view takes a disk from a forgotten point (a ``--disk`` backup left the disk's layer
  in an older point) gets a merged copy of that layer — the oldest such kept point only; later ones find
  the copy (see ``Repository.point_view``);
* a chain longer than *max_chain* layers is cut the same way at the point where it gets too long, so a
  chain restore never has more than *max_chain* layers per disk.

A kept point keeps its id, creation time, bitmap names and stats; the manifest says what was merged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

from .chain import resolve
from .errors import IntegrityError
from .manifest import KIND_FULL, KIND_INCREMENTAL, DiskRecord, Manifest

#: default bound on the layers of a chain (restore writes one qcow2 per layer)
MAX_CHAIN = 64
#: index objects a merged point names as hints (``Manifest.index_hints``)
MAX_HINTS = 64


def views(points: Iterable[Manifest]) -> dict[str, dict[str, Manifest]]:
    """Point id → the VM as of that point: disk → the point holding that disk's newest layer (the rule
    of ``Repository.point_view``, over manifests in memory)."""
    current: dict[str, Manifest] = {}
    out = {}
    for m in sorted(points, key=lambda p: p.id):
        current.update(dict.fromkeys(m.disks, m))
        out[m.id] = dict(current)
    return out


def chain_of(top: Manifest, disk: str, by_id: dict[str, Manifest]) -> list[Manifest]:
    """*top*'s layers of *disk* back to its full, newest first, from manifests in memory."""
    chain = [top]
    while chain[-1].disks[disk].kind != KIND_FULL:
        parent = chain[-1].disk_parent(disk)
        if parent is not None and parent not in by_id:
            parent = layer_copy(by_id.values(), disk, parent)
        if parent is None or parent not in by_id or disk not in by_id[parent].disks or len(chain) > len(by_id):
            raise IntegrityError(f"the chain of disk {disk} of point {top.id} (VM {top.vm}) is broken at "
                                 f"{chain[-1].id}: run 'fleece verify'; nothing was forgotten")
        chain.append(by_id[parent])
    return chain


def represents(record: DiskRecord, point_id: str) -> bool:
    """Whether *record* is a merged copy of its disk as of *point_id* (``layer_of``/``states_of``)."""
    return record.kind == KIND_FULL and (record.stats.get("layer_of") == point_id
                                         or point_id in record.stats.get("states_of", []))


def layer_copy(points: Iterable[Manifest], disk: str, forgotten: str) -> str | None:
    """The id of the point holding a merged copy of *disk* as of the *forgotten* point (``layer_of``):
    an incremental committed by a backup that began before the forget names the forgotten point as its
    parent (see ``Repository.disk_chain``)."""
    for m in sorted(points, key=lambda p: p.id):
        record = m.disks.get(disk)
        if m.id > forgotten and record is not None and represents(record, forgotten):
            return m.id
    return None


def merged_record(chain: list[Manifest], disk: str) -> DiskRecord:
    """*chain*'s layers of *disk* (newest first) as one self-contained full. ``stats.layer_of`` names the
    point whose state of the disk it is (kept through later copies), ``merged_from`` the layers merged."""
    pieces = resolve([m.disks[disk].extents for m in chain], [m.disks[disk].skips for m in chain])
    top = chain[0].disks[disk]
    kept = [p for p in pieces if p.blob is not None]  # a full's unlisted ranges read as zero
    whole = {e for m in chain for e in m.disks[disk].extents if e[0] not in m.disks[disk].parts
             and not m.disks[disk].skips.get(e[0])}
    # every point whose state of the disk this is (a copy of a copy stands for both): see represents()
    states = list(dict.fromkeys([*top.stats.get("states_of", []), top.stats.get("layer_of", chain[0].id), chain[0].id]))
    stats = {**top.stats, "merged_from": [m.id for m in chain], "layer_of": top.stats.get("layer_of", chain[0].id),
             "states_of": states[-MAX_HINTS:]}
    return DiskRecord(kind=KIND_FULL, virtual_size=top.virtual_size, extents=[(p.offset, p.length, p.blob) for p in kept],
                      granularity=top.granularity, qcow2=dict(top.qcow2), bitmap=top.bitmap, stats=stats, parent=None,
                      skips={p.offset: p.skip for p in kept if p.skip},
                      parts={p.offset for p in kept if p.skip or (p.offset, p.length, p.blob) not in whole})


def plan_merges(points: list[Manifest], forget: set[str], max_chain: int = MAX_CHAIN) -> dict[str, Manifest]:
    """Kept point id → its rewritten manifest, for every kept point that must change (see the module)."""
    if max_chain < 1:
        raise ValueError("max_chain must be at least 1")
    by_id = {m.id: m for m in points}
    view = views(points)
    depth: dict[tuple[str, str], int] = {}
    taken: set[tuple[str, str]] = set()
    out: dict[str, Manifest] = {}
    for point in sorted((m for m in points if m.id not in forget), key=lambda m: m.id):
        merged: dict[str, DiskRecord] = {}
        for disk, holder in sorted(view[point.id].items()):
            if holder.id == point.id:
                chain = chain_of(point, disk, by_id)
                # a kept parent was made whole already (kept points go oldest first): only the link matters
                if len(chain) == 1 or chain[1].id not in forget:
                    layers = 1 if len(chain) == 1 else depth[(chain[1].id, disk)] + 1
                    if layers <= max_chain:
                        depth[(point.id, disk)] = layers
                        continue
                merged[disk] = merged_record(chain, disk)
            elif holder.id in forget and (disk, holder.id) not in taken:
                taken.add((disk, holder.id))
                merged[disk] = merged_record(chain_of(holder, disk, by_id), disk)
            else:
                continue
            depth[(point.id, disk)] = 1
        if merged:
            out[point.id] = _rewrite(point, merged, by_id)
    return out


def _rewrite(point: Manifest, merged: dict[str, DiskRecord], by_id: dict[str, Manifest]) -> Manifest:
    disks: dict[str, DiskRecord] = {}
    for disk, record in point.disks.items():
        # incrementals name their parent explicitly: the point's own parent changes below
        disks[disk] = record if record.kind == KIND_FULL else replace(record, parent=point.disk_parent(disk))
    disks.update(merged)
    parents = sorted(r.parent for r in disks.values() if r.kind != KIND_FULL and r.parent)
    extra = dict(point.extra)
    history = list(extra.get("merges", []))
    history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "disks": {d: r.stats.get("merged_from", []) for d, r in sorted(merged.items())}})
    extra["merges"] = history
    # where the merged layers' blobs are indexed (bounded: a hint is only a shortcut)
    hints = list(point.index_hints)
    for chain_ids in (r.stats.get("merged_from", []) for r in merged.values()):
        hints.extend(h for i in chain_ids for h in by_id[i].index_hints if i in by_id)
    extra["index"] = list(dict.fromkeys(hints))[:MAX_HINTS]
    return replace(point, disks=disks, parent=parents[-1] if parents else None,
                   kind=KIND_INCREMENTAL if parents else KIND_FULL, extra=extra)
