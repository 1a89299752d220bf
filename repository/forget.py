"""``fleece forget``: drop a VM's points by a retention policy, keeping every kept point restorable.

Order (each step durable before the next, so an interruption anywhere leaves only valid points):

1. under the maintenance lock, read every manifest of the VM (a damaged one stops everything: the
   VM's view through it is unknown);
2. decide (``retention``), then plan the merges (``merge``): kept points that lose an older layer
   become self-contained;
3. rewrite those kept points, oldest first (same id, same bytes; ``Repository.replace_manifest``);
4. delete the forgotten manifests, newest first — a forgotten point still listed after an interruption
   keeps its own parents.

Nothing is deleted from ``data/``: the blobs no point needs any more are collected by ``prune``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from .errors import IntegrityError, RepositoryError
from .manifest import Manifest
from .locks import MaintenanceLock
from .merge import MAX_CHAIN, plan_merges
from .repo import Repository
from .retention import Candidate, Policy, apply_policy

#: ``events(name, detail)`` at the moments tests act on: ``planned``, ``rewritten`` (per point),
#: ``forgotten`` (per point)
Events = Callable[[str, dict[str, Any]], None]


@dataclass
class PointFate:
    id: str
    created: str
    kind: str
    keep: bool
    reasons: list[str]
    #: stored bytes of blobs only this point needs (what forgetting it alone frees, once pruned)
    frees: int = 0
    #: disks this kept point gets as merged, self-contained layers
    merged: list[str] = field(default_factory=list)
    protected: bool = False
    tags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "kind": self.kind, "action": "keep" if self.keep else "remove",
                "reasons": self.reasons, "frees_bytes": self.frees, "merged_disks": self.merged,
                "protected": self.protected, "tags": self.tags}


@dataclass
class ForgetReport:
    vm: str
    policy: str
    dry_run: bool
    points: list[PointFate]
    #: stored bytes of every blob that no point (of any VM) needs once the removed points are gone
    frees: int = 0
    removed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "policy": self.policy, "dry_run": self.dry_run, "frees_bytes": self.frees,
                "kept": sum(p.keep for p in self.points), "removed": self.removed, "rewritten": self.rewritten,
                "points": [p.as_dict() for p in self.points]}


def candidate(m: Manifest) -> Candidate:
    tags = m.extra.get("tags") or []
    return Candidate(m.id, _created(m), frozenset(str(t) for t in tags if isinstance(t, str)),
                     bool(m.extra.get("protected")))


def _created(m: Manifest) -> datetime:
    try:
        return datetime.fromisoformat(m.created.replace("Z", "+00:00"))
    except ValueError:
        raise IntegrityError(f"point {m.id} of VM {m.vm} has an unreadable creation time {m.created!r}") from None


def forget(repo: Repository, vm: str, policy: Policy, *, dry_run: bool = False, tz: tzinfo | None = None,
           max_chain: int = MAX_CHAIN, events: Events | None = None) -> ForgetReport:
    """Apply *policy* to *vm*'s points (see the module docstring); with *dry_run* change nothing."""
    repo.envelope.require_read("forget")
    if dry_run:
        return _forget(repo, vm, policy, True, tz, max_chain, events)
    with repo.maintenance("forget") as lock:
        return _forget(repo, vm, policy, False, tz, max_chain, events, lock)


def _forget(repo: Repository, vm: str, policy: Policy, dry_run: bool, tz: tzinfo | None, max_chain: int,
            events: Events | None, lock: MaintenanceLock | None = None) -> ForgetReport:
    emit = events or (lambda name, detail: None)
    repo.drop_cache()  # every manifest as it is now, not as this handle may have read it before
    scan = repo.scan(vm)
    if scan.damaged:
        point, why = next(iter(sorted(scan.damaged.items())))
        raise IntegrityError(f"point {point} of VM {vm} cannot be read ({why}): forget cannot tell what the other "
                             "points need from it, so nothing was forgotten; 'fleece verify' shows the damage")
    if not scan.points:
        raise RepositoryError(f"VM {vm!r} has no points in {repo.url}: nothing to forget")
    points = scan.points
    decisions = {d.id: d for d in apply_policy(policy, [candidate(m) for m in points], tz)}
    _keep_locked(repo, points, decisions)
    remove = {i for i, d in decisions.items() if not d.keep}
    rewrites = plan_merges(points, remove, max_chain)
    after = [rewrites.get(m.id, m) for m in points if m.id not in remove]
    fates = _fates(repo, vm, points, after, remove, decisions, rewrites)
    report = ForgetReport(vm, policy.describe(), dry_run, fates[0], fates[1])
    emit("planned", {"remove": sorted(remove), "rewrite": sorted(rewrites)})
    if dry_run:
        return report
    for point_id in sorted(rewrites):
        repo.replace_manifest(rewrites[point_id])
        report.rewritten.append(point_id)
        emit("rewritten", {"point": point_id})
    if lock is not None:
        lock.check()  # the merges are durable; deleting needs the lock still held
    for point_id in sorted(remove, reverse=True):
        repo.forget_manifest(vm, point_id)
        report.removed.append(point_id)
        emit("forgotten", {"point": point_id})
    return report


def _keep_locked(repo: Repository, points: list[Manifest], decisions: dict[str, Any]) -> None:
    """Under S3 Object Lock a point's manifest cannot be removed before its lock ends: such points are
    kept, whatever the policy says (the bucket would keep the locked version anyway)."""
    lock = repo.config.object_lock
    if lock is None:
        return
    now = time.time()
    for m in points:
        until = _created(m).timestamp() + lock["days"] * 86400
        if until > now:
            d = decisions[m.id]
            d.keep = True
            d.reasons.append(f"object lock until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(until))}Z")


def _blobs(m: Manifest) -> set[bytes]:
    return {b for rec in m.disks.values() for _, _, b in rec.extents if b is not None}


def _fates(repo: Repository, vm: str, points: list[Manifest], after: list[Manifest], remove: set[str],
           decisions: dict[str, Any], rewrites: dict[str, Manifest]) -> tuple[list[PointFate], int]:
    """Each point's fate and what the removals free, counting blobs other VMs share (dedup)."""
    still: set[bytes] = set().union(*(_blobs(m) for m in after)) if after else set()
    for other in repo.vms():
        if other != vm:
            for m in repo.scan(other).points:
                still |= _blobs(m)
    index = repo.load_index()

    def size(blobs: set[bytes]) -> int:
        return sum(loc.length for b in blobs if (loc := index.lookup(b)) is not None)

    gone = {m.id: _blobs(m) - still for m in points if m.id in remove}
    shared: dict[bytes, int] = {}
    for blobs in gone.values():
        for b in blobs:
            shared[b] = shared.get(b, 0) + 1
    fates = []
    for m in sorted(points, key=lambda p: p.id, reverse=True):
        d = decisions[m.id]
        merged = sorted(rewrites[m.id].extra["merges"][-1]["disks"]) if m.id in rewrites else []
        c = candidate(m)
        fates.append(PointFate(m.id, m.created, m.kind, d.keep, list(d.reasons),
                               size({b for b in gone.get(m.id, set()) if shared[b] == 1}), merged, c.protected,
                               sorted(c.tags)))
    return fates, size(set().union(*gone.values()) if gone else set())
