"""``fleece verify``: is every point restorable?

Without *read_data*: every manifest parses (its checksum holds), every chain is complete, every blob a
point refers to is in the index, and its pack exists and is long enough. With *read_data*: additionally
every referenced blob is read, decompressed and checked against its id (each blob once, however many
points share it).

A point is damaged when anything it needs is: its own manifest or blobs, or any point of its chains.
Nothing is ever silently skipped; a damaged index object is reported on its own line too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import IntegrityError, RepositoryError
from .manifest import Manifest
from .pack import pack_name
from .repo import ReadRange, Repository


@dataclass
class PointReport:
    vm: str
    id: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"vm": self.vm, "id": self.id, "status": "ok" if self.ok else "damaged", "problems": self.problems}


@dataclass
class VerifyReport:
    points: list[PointReport]
    repository_problems: list[str]
    blobs_checked: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.repository_problems and all(p.ok for p in self.points)


def verify(repo: Repository, vm: str | None = None, point: str | None = None, read_data: bool = False,
           workers: int = 4, progress: Callable[[int], None] | None = None) -> VerifyReport:
    index, damaged_indexes = repo.load_index_report()
    repo._index = index  # reads below use what is readable; the damage is reported
    report = VerifyReport([], [f"{name}: {exc}" for name, exc in damaged_indexes.items()])
    packs = {info.name: info.size for info in repo.backend.list("data/")}

    vms = [vm] if vm else repo.vms()
    manifests: dict[tuple[str, str], Manifest] = {}
    own: dict[tuple[str, str], list[str]] = {}
    for v in vms:
        scan = repo.scan(v)
        for m in scan.points:
            manifests[(v, m.id)] = m
        for pid, err in scan.damaged.items():
            own[(v, pid)] = [err]
    selected = sorted(own.keys() | manifests.keys())
    if point is not None:
        if vm is None:
            raise RepositoryError("--point needs --vm")
        target = point if point != "latest" else (selected[-1][1] if selected else point)
        matches = [k for k in selected if k[1] == target or k[1].startswith(target)]
        if len(matches) != 1:
            raise RepositoryError(f"VM {vm!r} has no point {point!r}; 'fleece list' shows the points that exist")
        selected = matches

    # Own problems of every point we may need (selected points and their chains).
    needed: dict[tuple[str, str], set[tuple[str, str]]] = {}  # point -> points of its chains
    blobs_of: dict[tuple[str, str], set[bytes]] = {}
    for key in selected:
        m = manifests.get(key)
        needed[key] = {key}
        if m is None:
            continue
        for disk in m.disks:
            try:
                chain = repo.disk_chain(m, disk)
            except IntegrityError as exc:
                own.setdefault(key, []).append(f"disk {disk}: {exc}")
                continue
            needed[key] |= {(c.vm, c.id) for c in chain}
    for key in set().union(*needed.values()) if needed else set():
        m = manifests.get(key)
        if m is None:
            continue
        problems = own.setdefault(key, [])
        blobs = blobs_of.setdefault(key, set())
        for disk, rec in m.disks.items():
            for _, _, blob in rec.extents:
                if blob is None or blob in blobs:
                    continue
                blobs.add(blob)
                loc = index.lookup(blob)
                if loc is None:
                    problems.append(f"disk {disk}: blob {blob.hex()} is not in the index")
                    continue
                name = pack_name(loc.pack)
                if name not in packs:
                    problems.append(f"disk {disk}: pack {name} (blob {blob.hex()}) is missing")
                elif packs[name] < loc.offset + loc.length:
                    problems.append(f"disk {disk}: pack {name} is truncated ({packs[name]} bytes)")

    if read_data:
        _read_all(repo, blobs_of, own, packs, report, workers, progress)

    for key in selected:
        rep = PointReport(key[0], key[1], list(own.get(key, [])))
        for dep in sorted(needed[key] - {key}):
            if own.get(dep):
                rep.problems.append(f"depends on damaged point {dep[1]}")
        report.points.append(rep)
    return report


def _read_all(repo: Repository, blobs_of: dict[tuple[str, str], set[bytes]], own: dict[tuple[str, str], list[str]],
              packs: dict[str, int], report: VerifyReport, workers: int,
              progress: Callable[[int], None] | None) -> None:
    """Read every referenced, locatable blob once; map failures back to the points that use them."""
    index = repo.load_index()
    readable = {b for blobs in blobs_of.values() for b in blobs
                if (loc := index.lookup(b)) is not None and pack_name(loc.pack) in packs}
    failures: dict[bytes, str] = {}
    lock = threading.Lock()

    def checked(nbytes: int) -> None:
        with lock:
            report.blobs_checked += 1
            report.bytes_read += nbytes
        if progress is not None:
            progress(nbytes)

    def check(rng: ReadRange) -> None:
        done: set[bytes] = set()
        try:
            for blob, plain in repo.read_blobs(rng):
                checked(len(plain))
                done.add(blob)
            return
        except RepositoryError:
            pass
        # Something in this range is bad: check the rest blob by blob so one bad blob hides no other.
        for blob, _ in rng.items:
            if blob in done:
                continue
            try:
                checked(len(repo.read_blob(blob)))
            except RepositoryError as exc:
                with lock:
                    failures[blob] = str(exc)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(check, repo.plan_reads(readable)))
    for key, blobs in blobs_of.items():
        for blob in sorted(blobs & failures.keys()):
            own.setdefault(key, []).append(failures[blob])
