"""``fleece prune``: delete what no point needs, while backups keep committing — without their locks.

One run, under the maintenance lock (``locks``), in this order:

1. **Scan**: read prune's records (``gc``), then every manifest of every VM (a damaged one stops the
   run: it may need any pack), then the index objects, then list the packs — the read ordering of
   docs/FORMAT.md. Packs no index object names (runs that failed before their index, or are still
   running) have their own tables read.
2. **Choose**: for every blob a point needs, one pack to keep it in (never a condemned one when another
   holds it, never one no index object names when another holds it). Packs chosen for no blob are unused.
   A chosen pack no index object names (its only copy of a blob: the index object that named it was lost)
   is *adopted*: an index object naming it is written before anything is condemned.
3. **Repack** the used packs that are mostly unused (``max_unused``): their needed blobs are read,
   checked and written again into new packs with their own index object; the old packs become unused.
4. **Condemn** the unused packs that no earlier prune condemned: one record, ``condemned/…``, with the
   time and the grace. Nothing is deleted yet: a backup may be about to commit a point that needs them.
5. **Delete** the packs of every record whose grace was over when the run began: the manifests are
   listed *again*, now; a pack holding a blob a point committed since needs (and no indexed pack that
   stays holds) is rescued. The index is consolidated into bounded objects without the deleted packs,
   nor packs already gone (written before the index objects it replaces are deleted, and before any
   pack is deleted: an index never names a deleted pack), the packs are deleted in batches, and the
   record is marked done (kept a while: ``gc.KEEP_DONE``).

A kill anywhere leaves a repository whose every point restores: nothing a listed manifest needs is
deleted, index objects go only after their replacement is durable, and a half-done step is redone by
the next run. ``grace=0`` deletes in the same run: only for a repository nobody else writes to.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import gc
from .errors import FormatMismatch, IntegrityError, ObjectNotFound, UsageError
from .index import Index, Location, PackRecord, decode_index, encode_index
from .pack import PackEntry, pack_name
from .locks import MaintenanceLock
from .repo import Repository
from .workers import map_all
from .writer import BlobWriter

log = logging.getLogger(__name__)

DEFAULT_GRACE = 24 * 3600.0
#: repack while more than this fraction of the stored bytes are blobs no point needs (restic's default)
DEFAULT_MAX_UNUSED = 0.05
#: entries per consolidated index object (~5 MiB of tables): whoever reads one holds it whole in memory
INDEX_ENTRIES = 100_000

#: ``events(name, detail)`` at the moments tests act on: ``scanned``, ``repacked``, ``condemned``,
#: ``rescanned``, ``indexed``, ``deleted``
Events = Callable[[str, dict[str, Any]], None]


@dataclass
class PruneReport:
    dry_run: bool
    grace: float
    packs: int = 0  #: packs listed
    stored_bytes: int = 0  #: bytes in those packs
    used_bytes: int = 0  #: payload bytes of blobs points need (one copy each)
    unused_bytes: int = 0  #: payload bytes no point needs, before this run
    condemned_packs: int = 0
    condemned_bytes: int = 0
    repacked_packs: int = 0
    repacked_bytes: int = 0  #: bytes of blobs written again by the repack
    deleted_packs: int = 0
    deleted_bytes: int = 0
    rescued_packs: int = 0
    index_objects: int = 0  #: index objects replaced by the consolidated one
    index: list[str] = field(default_factory=list)  #: the consolidated index objects written
    #: packs no index object named that hold the only copy of a needed blob: an index object now names them
    adopted_packs: int = 0
    locks_extended: int = 0  #: S3 Object Lock: live packs whose lock was extended
    records_done: int = 0
    records_removed: int = 0
    #: pending records and when their packs may be deleted
    waiting: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Scan:
    records: list[gc.Condemnation]
    needed: set[bytes]  #: blobs some point needs
    packs: dict[str, int]  #: listed pack id → size
    tables: dict[str, PackRecord]  #: pack id → (id, entries, header), from the index or the pack itself
    index_names: list[str]  #: index objects listed
    indexed: set[str]  #: packs those index objects name (what consolidation rewrites)
    mtimes: dict[str, float | None]  #: listed pack id → when it was written (Object Lock: extensions)
    #: packs a reader's index locates blobs in: *indexed*, and those of index objects written since the
    #: scan (this run's repack and adoption, backups that wrote theirs meanwhile). Only a copy in one of
    #: them may keep a blob: a pack in no index object holds bytes no restore can find
    located: set[str]


def prune(repo: Repository, *, grace: float = DEFAULT_GRACE, max_unused: float = DEFAULT_MAX_UNUSED,
          dry_run: bool = False, workers: int | None = None, events: Events | None = None,
          now: Callable[[], float] = time.time) -> PruneReport:
    """See the module docstring. A write-only key cannot prune (it could delete what it cannot verify)."""
    if grace < 0:
        raise ValueError("grace must not be negative")
    repo.envelope.require_read("prune")
    with repo.maintenance("prune") as lock:
        return _Pruner(repo, grace, max_unused, dry_run, workers or repo.backend.parallelism, events, now,
                       lock).run()


class _Pruner:
    def __init__(self, repo: Repository, grace: float, max_unused: float, dry_run: bool, workers: int,
                 events: Events | None, now: Callable[[], float], lock: MaintenanceLock | None = None) -> None:
        self.repo = repo
        self.grace = grace
        self.max_unused = max_unused
        self.dry_run = dry_run
        self.workers = max(1, workers)
        self.emit = events or (lambda name, detail: None)
        self.now = now
        self.report = PruneReport(dry_run, grace)
        self.lock = lock
        #: dry run: blobs the repack would have written again (the real run's new packs hold them)
        self.moved: set[bytes] = set()
        #: the one moment this run's choices treat as now: a record whose deadline passes while the run
        #: goes on waits for the next prune — were it due for the deleting phase but not for the choice,
        #: its rescued pack would be kept whole, and the next prune repack it (no fixed point)
        self.clock = 0.0
        self.condemned: gc.Condemnation | None = None  #: the record this run writes

    def run(self) -> PruneReport:
        self.clock = self.now()
        scan = self._scan()
        self.emit("scanned", {"packs": len(scan.packs)})
        pending = gc.pending_packs(scan.records)
        last = pending - self._revived(scan, pending)  # condemned packs that stay condemned
        holder = self._choose(scan, last)
        if self._adopt(scan, holder):  # choose again as the next prune will, seeing them indexed
            holder = self._choose(scan, last)
        locked = self.repo.config.object_lock
        if not locked:  # locked packs are kept, never rewritten
            self._repack(scan, holder, last)
        else:
            self._extend_locks(scan, set(holder.values()), locked["days"] * 86400.0)
        used = set(holder.values())
        fresh = sorted(set(scan.packs) - used - pending)
        self.report.condemned_packs = len(fresh)
        self.report.condemned_bytes = sum(scan.packs[p] for p in fresh)
        records = list(scan.records)
        if fresh:
            record = self.condemned = gc.new_record(fresh, self.grace, socket.gethostname(), self.now())
            if not self.dry_run:  # a dry run counts it as written: --grace 0 then reports its deletions too
                gc.write_record(self.repo.backend, self.repo.envelope, record)
                self.emit("condemned", {"record": record.name, "packs": fresh})
            records.append(record)
        self._delete_due(scan, records, used)
        self._expire(scan, records)
        return self.report

    # -- 1. scan ----------------------------------------------------------------------------------------

    def _scan(self) -> _Scan:
        repo = self.repo
        records = gc.read_records(repo.backend, repo.envelope)
        needed = self._needed()
        index_names = sorted(info.name for info in repo.backend.list("index/"))
        tables = self._tables(index_names)
        indexed = set(tables)
        listed = [info for info in repo.backend.list("data/") if info.name == pack_name(info.name.rsplit("/", 1)[1])]
        packs = {info.name.rsplit("/", 1)[1]: info.size for info in listed}

        orphans = sorted(set(packs) - set(tables))
        for pack_id, got in zip(orphans, map_all(lambda p: self._own_table(p, packs[p]), orphans,
                                                 workers=self.workers, name="fleece-prune-scan",
                                                 on_close=repo.backend.cancel)):
            if got is not None:
                tables[pack_id] = got
        held = {e.id for pack_id, (_, entries, _) in tables.items() if pack_id in packs for e in entries}
        if lost := needed - held:
            raise IntegrityError(f"{len(lost)} blob(s) that points need are in no pack (e.g. {next(iter(lost)).hex()}): "
                                 "prune deletes nothing in a damaged repository; run 'fleece verify' and 'fleece "
                                 "rebuild-index' first")
        self.report.packs = len(packs)
        self.report.stored_bytes = sum(packs.values())
        return _Scan(records, needed, packs, tables, index_names, indexed,
                     {info.name.rsplit("/", 1)[1]: info.mtime for info in listed}, set(indexed))

    def _needed(self) -> set[bytes]:
        """Every blob any point of any VM needs; a manifest that cannot be read stops the prune."""
        repo = self.repo
        repo.drop_cache()  # every manifest as it is now: forget rewrites them in place
        vms, unnamed = repo.vm_listing()
        if unnamed:
            where, why = next(iter(unnamed.items()))
            raise IntegrityError(f"{where}: {why}; prune deletes nothing while a point cannot be read (it may need "
                                 "any pack)", object=where)
        needed: set[bytes] = set()
        for vm in vms:
            scan = repo.scan(vm)
            if scan.damaged:
                point, why = next(iter(scan.damaged.items()))
                raise IntegrityError(f"point {point} of VM {vm} cannot be read ({why}): prune deletes nothing while a "
                                     "point cannot be read (it may need any pack); 'fleece verify' shows the damage")
            for m in scan.points:
                needed.update(b for rec in m.disks.values() for _, _, b in rec.extents if b is not None)
        return needed

    def _tables(self, index_names: list[str]) -> dict[str, PackRecord]:
        """Pack id → its record, from the index objects; a damaged one stops the prune."""
        tables: dict[str, PackRecord] = {}
        for name in index_names:
            try:
                records = decode_index(name.split("/", 1)[1], self.repo.backend.get(name), self.repo.envelope.meta)
            except ObjectNotFound:
                continue  # replaced by a rebuild-index meanwhile: the packs are listed anyway
            except FormatMismatch:
                raise
            except IntegrityError as exc:
                raise IntegrityError(f"{exc}: prune deletes nothing while an index object is damaged; run 'fleece "
                                     "rebuild-index' first", object=name) from None
            for record in records:
                tables.setdefault(record[0], record)
        return tables

    def _own_table(self, pack_id: str, size: int) -> PackRecord | None:
        """A pack no index names: its own table, or ``None`` when it is damaged (garbage either way)."""
        try:
            entries, header = self.repo.pack_trailer(pack_id, size)
        except IntegrityError as exc:
            log.warning("pack %s is in no index and damaged (%s): it is garbage", pack_name(pack_id), exc)
            return None
        return pack_id, entries, header

    # -- 2. choose --------------------------------------------------------------------------------------

    def _revived(self, scan: _Scan, pending: set[str]) -> set[str]:
        """Condemned packs whose grace is over and that hold a needed blob no pack outside a condemnation
        holds: a point committed in the grace needs them, so this run's deleting phase would rescue them.
        They are chosen and repacked like the live packs they are about to become — not ranked last and
        kept whole: condemned for being unused, they are mostly garbage, and a rescued pack kept whole would
        be repacked (condemned again) by the next prune, which no longer sees it condemned. One run must
        leave nothing for the next (the fixed point the prune torture checks)."""
        due = {p for r in scan.records if r.due(self.clock) for p in r.packs} & pending
        if not due:
            return set()
        live = {e.id for p, (_, entries, _) in scan.tables.items()
                if p in scan.packs and p in scan.located and p not in pending for e in entries}
        return {p for p in due if p in scan.packs and p in scan.tables
                and any(e.id in scan.needed and e.id not in live for e in scan.tables[p][1])}

    def _choose(self, scan: _Scan, pending: set[str]) -> dict[bytes, str]:
        """Needed blob → the pack that keeps it: listed, not condemned when another holds it, named by an
        index object when another is, and otherwise the pack holding most needed bytes (so duplicates end
        up in few packs). A pack no index names is ranked after every indexed one whatever it holds: a
        prune killed in its repack leaves one with copies of many packs' needed blobs, and chosen for them
        it would make the packs the index locates them in unused — condemned, deleted, and the points'
        blobs in no index object (found by the prune torture)."""
        worth: dict[str, int] = {}
        for pack_id, (_, entries, _) in scan.tables.items():
            if pack_id in scan.packs:
                worth[pack_id] = sum(e.length for e in entries if e.id in scan.needed)
        holder: dict[bytes, str] = {}
        for pack_id in sorted(worth, key=lambda p: (p in pending, p not in scan.located, -worth[p], p)):
            for e in scan.tables[pack_id][1]:
                if e.id in scan.needed:
                    holder.setdefault(e.id, pack_id)
        sizes = {e.id: e.length for p in set(holder.values()) for e in scan.tables[p][1]}
        self.report.used_bytes = sum(sizes[b] for b in holder)
        payload = sum(sum(e.length for e in scan.tables[p][1]) for p in scan.packs if p in scan.tables)
        self.report.unused_bytes = payload - self.report.used_bytes
        return holder

    def _adopt(self, scan: _Scan, holder: dict[bytes, str]) -> bool:
        """Write an index object naming the chosen packs no index object names: each holds the only copy
        (outside condemned packs) of a blob a point needs, so the index object that named it was lost
        (deleted by hand, or by a tool that knew no better). Without this its blobs stay unreadable to
        restores, and a later prune would see no indexed copy either. Written before anything is
        condemned or deleted: from then on readers and this run's deleting phase locate them. The object
        is one of the run's listed index objects from then on: a consolidation replaces it like them (an
        adopted pack repacked and deleted in this run must not stay named by it). Returns whether any was."""
        adopt = sorted(set(holder.values()) - scan.located)
        if not adopt:
            return False
        self.report.adopted_packs += len(adopt)
        log.warning("%d pack(s) hold the only copy of blobs points need but no index object names them (e.g. %s): "
                    "indexing them again", len(adopt), pack_name(adopt[0]))
        if not self.dry_run:
            index_id, data = encode_index([scan.tables[p] for p in adopt], self.repo.envelope.meta)
            self.repo.backend.put(f"index/{index_id}", data)
            scan.index_names.append(f"index/{index_id}")
        scan.located.update(adopt)
        scan.indexed.update(adopt)
        return True

    # -- 3. repack --------------------------------------------------------------------------------------

    def _repack(self, scan: _Scan, holder: dict[bytes, str], pending: set[str]) -> None:
        """Rewrite the needed blobs of the packs with most unused bytes until at most ``max_unused`` of
        the used packs' payload is unused. Moves *holder* (and *scan*) to the new packs.
        A condemned pack that a point needs again is left to the deleting phase, which rescues it whole
        (cheaper than copying its blobs)."""
        by_pack: dict[str, list[PackEntry]] = {}
        for pack_id, (_, entries, _) in scan.tables.items():
            if pack_id in scan.packs:
                by_pack[pack_id] = entries
        used = set(holder.values()) - pending
        unused = {p: sum(e.length for e in by_pack[p] if holder.get(e.id) != p) for p in used}
        total = sum(sum(e.length for e in by_pack[p]) for p in used)
        waste = sum(unused.values())
        chosen = []
        for pack_id in sorted(used, key=lambda p: (-unused[p] / max(1, scan.packs[p]), p)):
            if total == 0 or waste / total <= self.max_unused or unused[pack_id] == 0:
                break
            chosen.append(pack_id)
            kept = sum(e.length for e in by_pack[pack_id]) - unused[pack_id]
            total -= unused[pack_id] + kept
            waste -= unused[pack_id]
        if not chosen:
            return
        self._keep_copies_elsewhere(by_pack, holder, set(chosen), used - set(chosen))
        self.report.repacked_packs = len(chosen)
        self.report.repacked_bytes = sum(e.raw_length for p in chosen for e in by_pack[p] if holder.get(e.id) == p)
        if self.dry_run:
            for p in chosen:  # counted as unused from here on, as they will be
                for e in by_pack[p]:
                    if holder.get(e.id) == p:
                        holder[e.id] = ""
                        self.moved.add(e.id)  # would be in a new pack: the deleting phase counts it kept
            return
        repo = self.repo
        writer = BlobWriter(repo.backend, repo.config, Index(), envelope=repo.envelope)
        with writer:
            for pack_id in chosen:
                wanted = sorted((e for e in by_pack[pack_id] if holder.get(e.id) == pack_id), key=lambda e: e.offset)
                if not wanted:  # every needed blob of it has a copy in a pack that stays
                    continue
                start, end = wanted[0].offset, max(e.offset + e.length for e in wanted)
                data = memoryview(repo.read_range(pack_id, start, end - start))
                header = scan.tables[pack_id][2]
                for e in wanted:
                    loc = Location(pack_id, e.offset, e.length, e.raw_length, e.encoding, header)
                    writer.add(repo.decode(e.id, loc, data[e.offset - start:e.offset - start + e.length]))
            writer.flush()
        written = writer.written()
        for pack_id, entries, _ in written:
            for e in entries:
                holder[e.id] = pack_id
            scan.tables[pack_id] = (pack_id, entries, _)
            scan.packs[pack_id] = sum(e.length for e in entries)  # not listed: never condemned by this run
            scan.located.add(pack_id)  # the writer's own index object names it
        self.emit("repacked", {"packs": chosen, "new": [p for p, _, _ in written]})

    @staticmethod
    def _keep_copies_elsewhere(by_pack: dict[str, list[PackEntry]], holder: dict[bytes, str], chosen: set[str],
                               kept: set[str]) -> None:
        """A blob of a pack being repacked that a pack staying holds too (a duplicate: two backups raced
        to write it) moves to that copy instead of being written again. Otherwise the new pack would
        duplicate it, and the next prune, choosing per blob afresh, would find the new pack (partly)
        unused and condemn or repack it again: prune would never reach a fixed point."""
        moving = {e.id for p in chosen for e in by_pack[p] if holder.get(e.id) == p}
        for pack_id in sorted(kept):
            for e in by_pack[pack_id]:
                if e.id in moving:
                    holder[e.id] = pack_id
                    moving.discard(e.id)

    def _extend_locks(self, scan: _Scan, used: set[str], span: float) -> None:
        """S3 Object Lock: a pack a point needs stays locked as long as a new point's objects are. A
        pack's lock was set for *span* when it was written; once less than half of that is left, it is
        extended to a full *span* from now (one request per such pack)."""
        now = self.now()
        due = sorted(p for p in used if (scan.mtimes.get(p) or 0) + span < now + span / 2)
        self.report.locks_extended = len(due)
        if self.dry_run or not due:
            return
        map_all(lambda p: self.repo.backend.extend_lock(pack_name(p), now + span), due, workers=self.workers,
                name="fleece-prune-lock", on_close=self.repo.backend.cancel)

    # -- 5. delete --------------------------------------------------------------------------------------

    def _delete_due(self, scan: _Scan, records: list[gc.Condemnation], chosen: set[str]) -> None:
        now = self.now()
        # the earlier records as the choice saw them (``clock``); this run's own (grace 0) as of now
        due = [r for r in records if r.due(now if r is self.condemned else self.clock)]
        self.report.waiting = [{"record": r.name, "packs": len(r.packs), "deletable_from": r.deadline}
                               for r in records if r.state == gc.PENDING and r not in due]
        if not due:
            # entries of packs that are gone (a refused backup's index object, written after a prune
            # deleted its pack) are dropped at once: a backup must never deduplicate against them
            self._consolidate(scan, set(), only_if_many=not self._gone(scan))
            return
        doomed = {p for r in due for p in r.packs}
        # the manifests again, now that the grace is over: a point committed since may need a condemned pack
        needed = self._needed()
        located = scan.located | self._indexed_since(scan)
        self.emit("rescanned", {"due": [r.name for r in due]})
        keeps: dict[bytes, bool] = {}
        for pack_id, (_, entries, _) in scan.tables.items():
            # a pack the index names but that is gone keeps nothing, nor one no index object names
            if pack_id not in doomed and pack_id in scan.packs and pack_id in located:
                for e in entries:
                    keeps[e.id] = True
        keeps.update(dict.fromkeys(self.moved, True))
        rescued: set[str] = set()
        # the packs the choice kept blobs in first: rescuing another copy first (two condemned packs
        # holding one blob) would keep both, and the next prune condemn the one it does not choose
        for pack_id in sorted(doomed, key=lambda p: (p not in chosen, p)):
            record = scan.tables.get(pack_id)
            if record is None:
                continue
            if any(e.id in needed and not keeps.get(e.id) for e in record[1]):
                rescued.add(pack_id)
                for e in record[1]:
                    keeps[e.id] = True
        # blobs in packs written after the scan (new backups) are not in scan.tables: they are in no doomed pack
        doomed -= rescued
        present = sorted(p for p in doomed if p in scan.packs)
        self.report.rescued_packs = len(rescued)
        self.report.deleted_packs = len(present)
        self.report.deleted_bytes = sum(scan.packs[p] for p in present)
        if self.dry_run:
            return
        self._consolidate(scan, doomed, only_if_many=False)
        if self.lock is not None:
            self.lock.check()  # never delete packs after losing the lock to another maintenance run
        self.repo.backend.delete_many([pack_name(p) for p in present])
        self.emit("deleted", {"packs": present})
        for r in due:
            r.state, r.done_at = gc.DONE, self.now()
            r.deleted = sorted(set(r.packs) & doomed)
            r.rescued = sorted(set(r.packs) & rescued)
            gc.write_record(self.repo.backend, self.repo.envelope, r)
            self.report.records_done += 1

    def _indexed_since(self, scan: _Scan) -> set[str]:
        """Packs named by index objects written since the scan listed ``index/``: backups that committed
        meanwhile wrote theirs before their manifests, which the rescan just read. One that cannot be
        read names nothing here (its packs then spare no condemned pack: a rescue too many, never a loss)."""
        known = set(scan.index_names)
        out: set[str] = set()
        for info in self.repo.backend.list("index/"):
            if info.name in known:
                continue
            try:
                records = decode_index(info.name.split("/", 1)[1], self.repo.backend.get(info.name),
                                       self.repo.envelope.meta)
            except (ObjectNotFound, IntegrityError) as exc:
                log.warning("index object %s, written during this prune, cannot be read (%s)", info.name, exc)
                continue
            out.update(record[0] for record in records)
        return out

    @staticmethod
    def _gone(scan: _Scan) -> set[str]:
        """Packs an index object names that data/ did not list: deleted (a backup refused by the commit
        guard still wrote its index object naming the pack prune had deleted under it). Never needed:
        the scan stops when a needed blob is in no listed pack."""
        return scan.indexed - set(scan.packs)

    def _consolidate(self, scan: _Scan, doomed: set[str], only_if_many: bool) -> None:
        """One index object for every indexed pack that is listed and not *doomed*, then the listed
        index objects go."""
        if self.dry_run or (only_if_many and len(scan.index_names) < 2) or not scan.index_names:
            return
        gone = self._gone(scan)
        if gone:
            log.info("%d pack(s) named by the index are gone (e.g. %s): their entries are dropped", len(gone),
                     pack_name(min(gone)))
        indexed = {p: scan.tables[p] for p in scan.indexed if p not in doomed and p not in gone}
        written: list[str] = []
        for part in _chunks([indexed[p] for p in sorted(indexed)], INDEX_ENTRIES):
            index_id, data = encode_index(part, self.repo.envelope.meta)
            written.append(f"index/{index_id}")
            self.repo.backend.put(written[-1], data)
        old = [n for n in scan.index_names if n not in written]
        self.repo.backend.delete_many(old)
        self.report.index = written
        self.report.index_objects = len(old)
        scan.index_names = written
        self.emit("indexed", {"index": written, "replaced": old})
        self.repo._index = None

    def _expire(self, scan: _Scan, records: list[gc.Condemnation]) -> None:
        """Remove the done records old enough. One whose deleted packs an index object written during
        this run still names (a refused backup's, too late for this run's consolidation) stays until a
        prune has dropped that entry: while it stays, a backup deduplicating against the entry is refused."""
        if self.dry_run:
            return
        expired = [r for r in records if r.expired(self.now())]
        if any(r.deleted for r in expired):
            late = self._indexed_since(scan)
            expired = [r for r in expired if not late & set(r.deleted)]
        gone = [r.name for r in expired]
        if gone:
            self.repo.backend.delete_many(gone)
            self.report.records_removed = len(gone)


def _chunks(records: list[PackRecord], limit: int) -> list[list[PackRecord]]:
    """Packs grouped into index objects of about *limit* entries each (a pack is never split)."""
    out: list[list[PackRecord]] = [[]]
    count = 0
    for record in records:
        if count and count + len(record[1]) > limit:
            out.append([])
            count = 0
        out[-1].append(record)
        count += len(record[1])
    return [part for part in out if part]


def check_grace(text: str) -> float:
    """``--grace`` in seconds from a duration like ``24h``, ``90m``, ``2d``, ``0``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    try:
        if text == "0":
            return 0.0
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        value = -1
    if value < 0 or value != value:
        raise UsageError(f"--grace {text!r} is not a duration: use e.g. 24h, 90m, 2d, 30s or 0")
    return value
