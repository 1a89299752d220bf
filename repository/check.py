"""``fleece verify``: is every point restorable?

Without *read_data*: every manifest parses (its checksum holds), every chain is complete, every blob a
point refers to is in the index, and every pack the index names (with ``--vm``/``--point``: every pack
the checked points read) exists and has exactly the size its index entries imply — payloads back to
back, then table and footer — so a truncated or extended pack shows from the listing alone. With
*read_data*: additionally each of those packs' own trailer is read and checked — footer and magic
parse, the table's checksum holds, the pack's id is the SHA-256 of its trailer, and the table lists
exactly the blobs, offsets, lengths, raw lengths and encodings the index says — and every referenced
blob is read, decompressed and checked against its id (each blob once, however many points share it).
A damaged pack is reported by name with the points that need it, and each of those points is damaged:
even when its blobs still read, the pack could not be re-indexed if the index were lost.

A point is damaged when anything it needs is: its own manifest or blobs, or any point of its chains —
the chains of every disk the VM had as of that point (``Repository.point_view``), as a restore reads them.
Nothing is ever silently skipped; a damaged index object is reported on its own line too.

Read ordering
-------------
Writers make a run's objects durable in the order packs → index → manifest (the commit point), and
never hold a lock, so a reader always races with backups that are committing. The following
invariants keep such a race from being mistaken for damage:

* A reader that checks manifests against the index MUST list (and read) the manifests before it lists
  the index objects. Every index object a listed manifest needs was durable before that manifest was
  written, so a later listing of ``index/`` sees it. In the opposite order, a point committed by a
  concurrent backup between the two listings references blobs the loaded index does not know, and a
  healthy point would be called damaged.
* A reader that checks the index against the packs MUST list the index objects before it lists the
  packs, for the same reason one level down: a pack is durable before any index object naming it.
* Consequently objects that a later listing shows but an earlier one does not explain — a pack no
  loaded index names, an index object no listed manifest needs — MUST NOT be reported as damage: they
  may belong to a run still in progress (or to one that never committed: garbage for a future prune).
  A reader SHOULD check only what the earlier listings lead it to.
* ``rebuild-index`` follows the same order (manifests, index, packs) and MUST delete only the index
  objects it listed, and only after its new index object is durable; an index object written by a
  concurrent backup after that listing survives.
* A reader SHOULD treat a missing or unreadable object it was led to by an earlier listing as damage,
  never retry it away: nothing a committed point needs is ever deleted (prune deletes only packs no
  manifest listed after their grace needs, docs/FORMAT.md "garbage collection"). Packs named in a
  prune's ``condemned/`` record are the exception: one that no checked point reads may vanish, and
  its absence is not damage (the records are read after ``data/`` is listed, so a pack deleted
  before that listing is in one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import FleeceError, IntegrityError, RepositoryError, UsageError
from .gc import read_records
from .index import Index
from .manifest import Manifest
from .pack import PackEntry, pack_name
from .repo import ReadRange, Repository
from .workers import map_all, run_all


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
    bytes_read: int = 0  #: plaintext bytes of the blobs read and checked
    seconds: float = 0.0  #: how long the whole verify took (a DR drill's number: see :attr:`mb_per_s`)
    #: pack name → {"problem": what is wrong with it, "points": "vm/point" of every checked point needing it}
    damaged_packs: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.repository_problems and all(p.ok for p in self.points)

    @property
    def mb_per_s(self) -> float:
        """Plaintext MB (10^6 bytes) read and checked per second of the whole run."""
        return round(self.bytes_read / 1e6 / self.seconds, 1) if self.seconds > 0 else 0.0


def verify(repo: Repository, vm: str | None = None, point: str | None = None, read_data: bool = False,
           workers: int = 4, progress: Callable[[int], None] | None = None) -> VerifyReport:
    # Read ordering (see the module docstring): 1. the manifests — listed and read, chains and views
    # resolved — before 2. the index, before 3. the packs.
    started = time.monotonic()
    if read_data:
        repo.envelope.require_read("verify --read-data")
    # format 2: VMs none of whose manifests opens (their names are unknown), from the same listing
    vms, unknown = ([vm], {}) if vm else repo.vm_listing()
    unnamed = [f"{key}: no manifest can be read ({why})" for key, why in unknown.items()]
    manifests: dict[tuple[str, str], Manifest] = {}
    own: dict[tuple[str, str], list[str]] = {}
    for v in vms:
        scan = repo.scan(v)
        for m in scan.points:
            manifests[(v, m.id)] = m
        for pid, err in scan.damaged.items():
            own[(v, pid)] = [err]
    selected = sorted(own.keys() | manifests.keys())
    ids_of: dict[str, list[str]] = {}
    for v, pid in selected:
        ids_of.setdefault(v, []).append(pid)
    if point is not None:
        if vm is None:
            raise RepositoryError("--point needs --vm")
        target = point if point != "latest" else (selected[-1][1] if selected else point)
        exact = [k for k in selected if k[1] == target]
        matches = exact or [k for k in selected if k[1].startswith(target)]
        if len(matches) > 1:
            shown = ", ".join(k[1] for k in matches[:10])
            raise UsageError(f"--point {point!r} is ambiguous for VM {vm!r}: it starts {len(matches)} point ids "
                             f"({shown}); give more of the id")
        if not matches:
            raise RepositoryError(f"VM {vm!r} has no point {point!r}; 'fleece list' shows the points that exist")
        selected = matches

    # Own problems of every point we may need (selected points and the chains of every disk the VM had
    # as of each: what restoring it reads, see Repository.point_view).
    needed: dict[tuple[str, str], set[tuple[str, str]]] = {}  # point -> points of its chains
    # problems of a point's view that are not problems of its own layers (not passed on to points needing it)
    of_view: dict[tuple[str, str], list[str]] = {}
    blobs_of: dict[tuple[str, str], set[bytes]] = {}
    for key in selected:
        m = manifests.get(key)
        needed[key] = {key}
        if m is None:
            continue
        try:
            view = repo.point_view(m, ids=ids_of[key[0]])
        except RepositoryError as exc:
            of_view[key] = [str(exc)]
            view = dict.fromkeys(m.disks, m)
        for disk, layer in view.items():
            try:
                chain = repo.disk_chain(layer, disk)
            except IntegrityError as exc:
                (own if layer is m else of_view).setdefault(key, []).append(f"disk {disk}: {exc}")
                continue
            needed[key] |= {(c.vm, c.id) for c in chain}
    # 2. the index, only now: every blob of every point read above was indexed before its point committed
    index, damaged_indexes = repo.load_index_report(keep_tables=True)
    repo._index = index  # reads below use what is readable; the damage is reported
    report = VerifyReport([], [f"{name}: {exc}" for name, exc in damaged_indexes.items()])
    report.repository_problems.extend(unnamed)
    # 3. the packs, after the index: every pack the index names was durable before it
    packs = {info.name: info.size for info in repo.backend.list("data/")}
    uses: dict[tuple[str, str], dict[str, set[str]]] = {}  # point -> pack id it reads -> disks reading it
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
                uses.setdefault(key, {}).setdefault(loc.pack, set()).add(disk)

    # Packs: everything the index names (restricted: what the checked points read) must be as it says.
    to_check = {pack for used in uses.values() for pack in used}
    if vm is None and point is None:
        # After the listing of data/: a pack a prune deleted before that listing is in a record by now.
        # Condemned packs no checked point reads are prune's, and may vanish while verify runs.
        condemned = {p for r in read_records(repo.backend, repo.envelope) for p in r.packs}
        to_check |= index.packs - condemned
    damaged_packs = _check_packs(repo, index, sorted(to_check), packs, read_data, workers)
    for key, used in uses.items():
        for pack in sorted(used.keys() & damaged_packs.keys()):
            own.setdefault(key, []).append(f"disk {', '.join(sorted(used[pack]))}: {damaged_packs[pack]}")
    for pack, problem in sorted(damaged_packs.items()):
        users = {key for key, used in uses.items() if pack in used}
        affected = [f"{v}/{i}" for v, i in selected if needed[(v, i)] & users]
        report.damaged_packs[pack_name(pack)] = {"problem": problem, "points": affected}
        shown = ", ".join(affected[:10]) + (f" and {len(affected) - 10} more" if len(affected) > 10 else "")
        report.repository_problems.append(
            f"{problem}; " + (f"points that need it: {shown}" if affected else "no checked point needs it"))

    if read_data:
        _read_all(repo, blobs_of, own, packs, report, workers, progress)

    for key in selected:
        rep = PointReport(key[0], key[1], own.get(key, []) + of_view.get(key, []))
        for dep in sorted(needed[key] - {key}):
            if own.get(dep):
                rep.problems.append(f"depends on damaged point {dep[1]}")
        report.points.append(rep)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _check_packs(repo: Repository, index: Index, pack_ids: list[str], packs: dict[str, int], read_data: bool,
                 workers: int) -> dict[str, str]:
    """Check each pack against what the index says about it; returns pack id → problem, for damaged ones."""
    tables = index.tables or {}

    def check(pack_id: str) -> tuple[str, list[str]]:
        name = pack_name(pack_id)
        variants = tables.get(pack_id, {})
        if name not in packs:
            return pack_id, [f"pack {name} is missing"]
        size, problems = packs[name], []
        for entries in variants:
            want = repo.envelope.packs.size(entries)
            if size != want:
                problems.append(f"pack {name} is {size} bytes, but the index says it holds {len(entries)} blobs "
                                f"in {want} bytes ({'truncated' if size < want else 'bytes appended'})")
                break
        header = index.headers.get(pack_id, b"")
        if header and repo.keys is not None and repo.keys.can_read:
            # one X25519 exchange per pack: a pack whose key is sealed to another public key (a write-only
            # host misled by a planted slot) is unrestorable, and is said so here, not at restore time
            try:
                repo.keys.pack_key(header, name)
            except IntegrityError as exc:
                problems.append(f"{exc} (its pack key is not sealed to this repository's key)")
        if read_data:
            hint = len(next(iter(variants))) if variants else None
            try:
                actual, header = repo.pack_trailer(pack_id, size, count_hint=hint)
            except IntegrityError as exc:
                problems.append(str(exc))
            else:
                if index.headers.get(pack_id, b"") != header:
                    problems.append(f"pack {name}: the index gives it another pack key than its own header")
                for entries, sources in variants.items():
                    if set(entries) != set(actual) or len(entries) != len(actual):
                        problems.append(f"pack {name}: {', '.join(sources)} disagree(s) with the pack's own table "
                                        f"({_table_diff(entries, actual)})")
        return pack_id, problems

    results = map_all(check, pack_ids, workers=max(1, workers), name="fleece-verify", on_close=repo.backend.cancel)
    return {pack_id: "; ".join(problems) for pack_id, problems in results if problems}


def _table_diff(said: tuple[PackEntry, ...], actual: list[PackEntry]) -> str:
    """How an index's entries for a pack differ from the pack's own table, in words."""
    a, b = {e.id: e for e in said}, {e.id: e for e in actual}
    parts = []
    if only := sorted(a.keys() - b.keys()):
        parts.append(f"{len(only)} blob(s) the pack does not hold, e.g. {only[0].hex()}")
    if only := sorted(b.keys() - a.keys()):
        parts.append(f"{len(only)} blob(s) the index does not list, e.g. {only[0].hex()}")
    if moved := sorted(i for i in a.keys() & b.keys() if a[i] != b[i]):
        x, y = a[moved[0]], b[moved[0]]
        parts.append(f"{len(moved)} blob(s) described differently, e.g. {moved[0].hex()}: index says offset "
                     f"{x.offset} length {x.length} raw length {x.raw_length} encoding {x.encoding}, pack says "
                     f"{y.offset}/{y.length}/{y.raw_length}/{y.encoding}")
    return "; ".join(parts) or "duplicate entries"


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

    run_all(repo.plan_reads(readable), lambda: check, workers=max(1, workers), name="fleece-verify",
            on_close=repo.backend.cancel)
    for key, blobs in blobs_of.items():
        for blob in sorted(blobs & failures.keys()):
            own.setdefault(key, []).append(failures[blob])


def verify_total(repo: Repository, vm: str | None, point: str | None) -> int | None:
    """The bytes ``verify --read-data`` reads, known before it starts: each distinct blob the checked points
    use, once (a blob's plaintext is as long as its extents). Only blobs that are in the index and in a pack
    are read, so in a damaged repository the line ends short of 100 %. The manifests read here are cached:
    verify does not read them again. ``None`` when the selection cannot be resolved (verify says why)."""
    try:
        if point:
            m = repo.find_point(vm, point)
            points = [layer for disk, top in repo.point_view(m).items() for layer in repo.disk_chain(top, disk)]
        else:
            points = [m for vm in ([vm] if vm else repo.vms()) for m in repo.scan(vm).points]
    except FleeceError:
        return None
    sizes = {blob: n for m in points for rec in m.disks.values() for _, n, blob in rec.extents if blob is not None}
    return sum(sizes.values())
