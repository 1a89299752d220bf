"""Garbage collection at the repository API (issue #12): forget, prune, condemnation records, the
backups' commit guard, the maintenance lock and the manifest merges — against local repositories, no QEMU.

Each test builds a small repository by hand (blobs through ``Repository.writer()``, synthetic manifests
through ``Repository.commit``), keeps the ground truth of every point in memory and asserts exact
outcomes: which packs are condemned, deleted or rescued, which commits are refused, and that every point
still restores byte for byte. Time is never waited for: prune's ``now``, hand-made records and the
guard's clock stand in for the hours a grace lasts.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checks import materialize
from fleece.repository import DiskRecord, Manifest, RepoConfig, Repository, new_point_id
from fleece.repository import check, gc
from fleece.repository import manifest as manifest_mod
from fleece.repository.backends import Backend, BackendWrapper, Counting, LocalBackend, layer, open_backend
from fleece.repository.chain import resolve
from fleece.repository.credentials import Credential
from fleece.repository.errors import IntegrityError, LockedError, PruneConflict
from fleece.repository.forget import forget
from fleece.repository.index import Index, decode_index
from fleece.repository.locks import LOCK_NAME, STALE, MaintenanceLock
from fleece.repository.merge import plan_merges
from fleece.repository.pack import pack_name
from fleece.repository.prune import prune
from fleece.repository.retention import Policy
from fleece.repository.writer import BlobWriter, WriterStats

PW = Credential("passphrase", b"pw", "test")
CH = 64 << 10  #: chunk size: a whole disk is 8 blobs, a run's blobs fit in one pack
SIZE = 8 * CH
VM = "vm1"
T0 = time.time() - 100 * 86400  #: points are a day apart, all in the past
FORMATS = ["plain", "encrypted"]
HOUR = 3600.0


# -- repositories and points ----------------------------------------------------------------------------

def create(path: Path, fmt: str = "encrypted") -> Repository:
    config = RepoConfig.encrypted(chunk_size=CH) if fmt == "encrypted" else RepoConfig(chunk_size=CH)
    return Repository.open(str(path), create=True, config=config, credential=PW)


def reopen(path: Path) -> Repository:
    """A fresh handle: what another process (a backup, a prune, a restore) would see."""
    return Repository.open(str(path), credential=PW)


def store(repo: Repository, blobs: list[bytes], writer: BlobWriter | None = None) -> tuple[list[bytes], WriterStats]:
    """One writer run over *blobs* (one pack, one index object); their ids and the run's stats."""
    w = writer or repo.writer()
    ids = [b""] * len(blobs)
    for i, data in enumerate(blobs):
        w.add(data, lambda ident, stored, i=i: ids.__setitem__(i, ident))
    return ids, w.flush()


def orphan(repo: Repository, rng: random.Random, *, index: bool = True) -> str:
    """The pack of a run that never committed (its writer flushed, no manifest followed); with
    ``index=False`` a run killed between its packs and its index (:func:`unindexed_pack`). Returns the
    pack id."""
    if not index:
        return unindexed_pack(repo, [rng.randbytes(CH // 2)])[0]
    w = repo.writer()
    before = index_objects(repo)
    store(repo, [rng.randbytes(CH // 2)], w)
    (pack,) = [p for p, _, _ in w.written()]
    (_,) = index_objects(repo) - before  # one index object, naming it
    return pack


def unindexed_pack(repo: Repository, blobs: list[bytes]) -> tuple[str, list[bytes]]:
    """A pack of *blobs* whose index object is lost (a plain writer, its index object deleted)."""
    w = BlobWriter(repo.backend, repo.config, Index(), envelope=repo.envelope)
    before = index_objects(repo)
    ids, _ = store(repo, blobs, w)
    (pack,) = [p for p, _, _ in w.written()]
    (made,) = index_objects(repo) - before
    repo.backend.delete(made)
    return pack, ids


def packs_listed(repo: Repository) -> set[str]:
    return {i.name.rsplit("/", 1)[1] for i in repo.backend.list("data/")}


def index_objects(repo: Repository) -> set[str]:
    return {i.name for i in repo.backend.list("index/")}


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Vm:
    """One VM with one disk ``vda`` of ground truth, backed up point by point like ``fleece backup`` does:
    blobs first (:meth:`prepare`), the manifest last (:meth:`commit`). A refused commit leaves the truth
    as it was, so the model never drifts from the repository."""

    def __init__(self, repo: Repository, seed: int = 0) -> None:
        self.repo = repo
        self.rng = random.Random(seed)
        self.disk = bytearray(SIZE)
        self.ids: list[str] = []
        self.truth: dict[str, bytes] = {}
        self._pending: dict[str, bytearray] = {}
        self._clock = 0
        self.stats: WriterStats | None = None

    def rand(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def prepare(self, writes: list[tuple[int, bytes]], *, full: bool = False, repo: Repository | None = None,
                writer: BlobWriter | None = None) -> Manifest:
        """Store the blobs of a point that writes *writes* (offset, bytes; inside one chunk each) and
        return its manifest, not committed yet. A full lists every chunk that is not zero."""
        disk = bytearray(self.disk)
        for off, data in writes:
            assert off // CH == (off + len(data) - 1) // CH, "a blob never crosses the chunk grid"
            disk[off:off + len(data)] = data
        if full:
            ranges = [(c * CH, CH) for c in range(SIZE // CH) if any(disk[c * CH:(c + 1) * CH])]
        else:
            ranges = sorted((off, len(data)) for off, data in writes)
        ids, self.stats = store(repo or self.repo, [bytes(disk[o:o + n]) for o, n in ranges], writer)
        self._clock += 1
        t = T0 + self._clock * 86400
        parent = None if full or not self.ids else self.ids[-1]
        kind = "full" if parent is None else "incremental"
        record = DiskRecord(kind=kind, virtual_size=SIZE, extents=[(o, n, b) for (o, n), b in zip(ranges, ids)],
                            parent=parent)
        m = Manifest(id=new_point_id(t), vm=VM, created=stamp(t), parent=parent, kind=kind, disks={"vda": record})
        self._pending[m.id] = disk
        return m

    def commit(self, m: Manifest, repo: Repository | None = None, packs: set[str] | None = None) -> None:
        (repo or self.repo).commit(m, packs)
        self.disk = self._pending.pop(m.id)
        self.ids.append(m.id)
        self.truth[m.id] = bytes(self.disk)

    def point(self, writes: list[tuple[int, bytes]], *, full: bool = False) -> str:
        m = self.prepare(writes, full=full)
        self.commit(m)
        return m.id

    def history(self) -> list[str]:
        """Six points: a full, then incrementals that overwrite whole chunks (the blobs they replace become
        unused once the layers are merged) and parts of chunks (merged layers reference parts of blobs)."""
        c = CH
        self.point([(i * c, self.rand(c)) for i in range(8)], full=True)
        self.point([(0, self.rand(c)), (c, self.rand(c)), (2 * c + 100, self.rand(5000))])
        self.point([(3 * c, self.rand(c)), (4 * c + 7, self.rand(999)), (6 * c, self.rand(c))])
        self.point([(5 * c + 300, self.rand(c - 300)), (6 * c, self.rand(c))])
        self.point([(1 * c + 10, self.rand(4000)), (7 * c, self.rand(c))])
        self.point([(2 * c, self.rand(c // 2)), (7 * c + 1, self.rand(c - 1))])
        return self.ids

    def assert_restores(self, path: Path, ids: list[str] | None = None) -> None:
        """Every point (or *ids*) read back through a fresh handle equals its ground truth, byte for byte."""
        repo = reopen(path)
        listed = repo.point_ids(VM)
        for pid in listed if ids is None else ids:
            got = materialize(repo, repo.manifest(VM, pid), "vda")
            assert got == self.truth[pid], f"point {pid} does not restore byte-exact"


def needed_packs(repo: Repository) -> set[str]:
    """The packs a fresh handle reads for every blob of every listed point."""
    index = repo.load_index()
    out = set()
    for vm in repo.vms():
        for m in repo.scan(vm).points:
            for rec in m.disks.values():
                out |= {index.lookup(b).pack for _, _, b in rec.extents if b is not None}
    return out


def assert_clean(path: Path) -> None:
    """``verify --read-data`` finds nothing, and ``data/`` holds exactly the packs the points read."""
    repo = reopen(path)
    report = check.verify(repo, None, None, read_data=True)
    assert report.repository_problems == []
    assert [p.problems for p in report.points if p.problems] == []
    repo = reopen(path)
    assert packs_listed(repo) == needed_packs(repo)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def condemned_orphan(path: Path, grace: float = HOUR) -> tuple[Vm, Repository, Manifest, str]:
    """A repository with one point and the orphan pack of an interrupted run; a backup handle that
    loaded its index before any prune prepares a point deduplicating against that pack; then a prune
    condemns the pack. Returns (vm, the backup's handle, its manifest, the pack)."""
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    content = vm.rand(CH)
    [blob], _ = store(repo, [content])  # the run that never committed
    pack = repo.load_index().lookup(blob).pack
    backup = reopen(path)
    m = vm.prepare([(2 * CH, content)], repo=backup)
    assert vm.stats is not None and (vm.stats.dedup_blobs, vm.stats.new_blobs) == (1, 0)
    report = prune(reopen(path), grace=grace)
    assert (report.condemned_packs, report.deleted_packs) == (1, 0 if grace else 1)
    return vm, backup, m, pack


# -- 1./2. the grace: commit, rescue, conflict ----------------------------------------------------------

def test_a_backup_deduplicating_against_a_condemned_pack_commits_in_the_grace_and_rescues_it(path: Path) -> None:
    vm, backup, m, pack = condemned_orphan(path)
    (record,) = gc.read_records(backup.backend, backup.envelope)
    assert (record.state, record.packs, record.grace) == (gc.PENDING, [pack], HOUR)
    vm.commit(m, backup)  # in the grace: allowed
    later = prune(reopen(path), grace=HOUR, now=lambda: record.deadline)
    assert (later.rescued_packs, later.deleted_packs, later.condemned_packs, later.records_done) == (1, 0, 0, 1)
    (done,) = gc.read_records(backup.backend, backup.envelope)
    assert (done.state, done.rescued, done.deleted) == (gc.DONE, [pack], [])
    assert pack in packs_listed(backup)
    vm.assert_restores(path)
    assert_clean(path)


def test_a_commit_once_the_grace_is_nearly_over_is_refused_and_writes_no_manifest(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vm, backup, m, pack = condemned_orphan(path)
    (record,) = gc.read_records(backup.backend, backup.envelope)
    cut = record.deadline - gc.skew(HOUR)
    assert gc.skew(HOUR) == 300.0 and gc.skew(40.0) == 10.0
    monkeypatch.setattr(backup.guard, "_now", lambda: cut)
    with pytest.raises(PruneConflict) as err:
        vm.commit(m, backup)
    assert err.value.object == pack_name(pack)
    assert reopen(path).point_ids(VM) == vm.ids  # no manifest
    assert not backup.backend.exists(backup.envelope.manifest_name(VM, m.id))
    monkeypatch.setattr(backup.guard, "_now", lambda: cut - 1)  # one second earlier it would have landed
    vm.commit(m, backup)
    assert reopen(path).point_ids(VM) == vm.ids
    vm.assert_restores(path)


def test_a_commit_needing_a_pack_a_done_record_deleted_is_refused(path: Path) -> None:
    vm, backup, m, pack = condemned_orphan(path, grace=0)  # grace 0: condemned and deleted in one run
    (record,) = gc.read_records(backup.backend, backup.envelope)
    assert (record.state, record.deleted) == (gc.DONE, [pack])
    with pytest.raises(PruneConflict) as err:
        vm.commit(m, backup)
    assert err.value.object == pack_name(pack)
    assert reopen(path).point_ids(VM) == vm.ids


def test_a_hand_made_done_record_refuses_the_commit_and_a_pending_one_in_its_grace_does_not(path: Path) -> None:
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    backup = reopen(path)
    m = vm.prepare([(CH, vm.rand(CH))], repo=backup)
    (pack,) = backup.needed_packs(m)
    pending = gc.new_record([pack], 10 * HOUR, "elsewhere", time.time() - HOUR)
    gc.write_record(repo.backend, repo.envelope, pending)
    done = gc.new_record([pack], 0, "elsewhere", time.time() - 2 * HOUR)
    done.state, done.done_at, done.deleted = gc.DONE, time.time() - HOUR, [pack]
    gc.write_record(repo.backend, repo.envelope, done)
    with pytest.raises(PruneConflict):
        vm.commit(m, backup)
    repo.backend.delete(done.name)
    vm.commit(m, backup)  # the pending record alone leaves 9 h of grace
    assert reopen(path).point_ids(VM) == vm.ids


# -- 3. long runs ---------------------------------------------------------------------------------------

def test_a_long_run_heads_every_needed_pack_and_refuses_when_one_is_gone(path: Path) -> None:
    repo = create(path)
    vm = Vm(repo)
    first = vm.point([(i * CH, vm.rand(CH)) for i in range(3)], full=True)
    old = repo.manifest(VM, first).disks["vda"].extents
    (base,) = {repo.load_index().lookup(b).pack for _, _, b in old}

    backup = reopen(path)  # dedups chunk 0's content at chunk 5, stores a new blob at chunk 6
    m = vm.prepare([(5 * CH, bytes(vm.disk[:CH])), (6 * CH, vm.rand(CH))], repo=backup)
    needed = backup.needed_packs(m)
    assert base in needed and len(needed) == 2
    backup.guard.loaded_at -= gc.LONG_RUN
    heads = backup.requests().get("HEAD", 0)
    vm.commit(m, backup)
    assert backup.requests().get("HEAD", 0) - heads == 2  # one HEAD per needed pack

    late = reopen(path)
    m2 = vm.prepare([(7 * CH, bytes(vm.disk[CH:2 * CH]))], repo=late)
    assert late.needed_packs(m2) == {base}
    repo.backend.delete(pack_name(base))  # deleted by a prune whose done record has expired since
    late.guard.loaded_at -= gc.LONG_RUN
    with pytest.raises(PruneConflict) as err:
        vm.commit(m2, late)
    assert err.value.object == pack_name(base)
    assert reopen(path).point_ids(VM) == vm.ids


# -- 4. no dedup against condemned packs ----------------------------------------------------------------

def test_the_writer_stores_a_condemned_blob_again_and_lookups_prefer_the_new_copy(path: Path) -> None:
    repo = create(path)
    content = random.Random(4).randbytes(CH)
    [blob], _ = store(repo, [content])
    condemned = repo.load_index().lookup(blob).pack
    assert prune(reopen(path), grace=HOUR).condemned_packs == 1

    backup = reopen(path)
    [again], stats = store(backup, [content])
    assert again == blob
    assert (stats.new_blobs, stats.dedup_blobs, stats.packs) == (1, 0, 1)
    fresh = backup.load_index().lookup(blob).pack
    assert fresh != condemned and fresh in packs_listed(backup)
    assert reopen(path).load_index().lookup(blob).pack == fresh  # whichever index object is read first

    tables = reopen_tables(path)
    for order in ([condemned, fresh], [fresh, condemned]):
        index = Index()
        index.condemned = {condemned}
        for p in order:
            index.add_pack(p, next(iter(tables[p])))
        assert index.lookup(blob).pack == fresh


def reopen_tables(path: Path) -> dict[str, dict]:
    """Pack id → its tables as the index objects give them."""
    index, _ = reopen(path).load_index_report(keep_tables=True)
    assert index.tables is not None
    return index.tables


class Listing(BackendWrapper):
    """Lists in a chosen order (sorted, or reversed): which index object a reader sees first."""

    def __init__(self, inner: Backend, reverse: bool) -> None:
        super().__init__(inner)
        self.reverse = reverse

    def list(self, prefix: str = ""):
        return iter(sorted(self.inner.list(prefix), key=lambda i: i.name, reverse=self.reverse))


def test_a_fresh_reader_locating_few_blobs_prefers_the_copy_that_is_not_condemned(path: Path) -> None:
    repo = create(path)
    content = random.Random(4).randbytes(CH)
    [blob], _ = store(repo, [content])
    condemned = repo.load_index().lookup(blob).pack
    assert prune(reopen(path), grace=HOUR).condemned_packs == 1
    store(reopen(path), [content])
    for reverse in (False, True):
        reader = reopen(path)
        reader.backend = Listing(reader.backend, reverse)
        (where,) = reader.plan_reads([blob])
        assert where.pack != condemned, f"listing {'reversed' if reverse else 'sorted'}: reads the condemned copy"


# -- 5. orphans -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_orphans_are_condemned_then_deleted_after_the_grace(path: Path, fmt: str) -> None:
    repo = create(path, fmt)
    vm = Vm(repo)
    vm.point([(i * CH, vm.rand(CH)) for i in range(4)], full=True)
    keep = packs_listed(repo)
    rng = random.Random(5)
    flushed, unindexed, damaged = orphan(repo, rng), orphan(repo, rng, index=False), orphan(repo, rng, index=False)
    damaged_file = path / pack_name(damaged)
    damaged_file.write_bytes(damaged_file.read_bytes()[:-100])  # truncated: its own table is unreadable
    garbage = {flushed, unindexed, damaged}
    t = time.time()

    first = prune(reopen(path), grace=600, now=lambda: t)
    assert (first.condemned_packs, first.deleted_packs) == (3, 0)
    (record,) = gc.read_records(repo.backend, repo.envelope)
    assert set(record.packs) == garbage and packs_listed(repo) == keep | garbage
    early = prune(reopen(path), grace=600, now=lambda: t + 599)
    assert (early.condemned_packs, early.deleted_packs) == (0, 0)
    assert [w["record"] for w in early.waiting] == [record.name]
    assert packs_listed(repo) == keep | garbage

    due = prune(reopen(path), grace=600, now=lambda: t + 600)
    assert (due.deleted_packs, due.rescued_packs, due.records_done) == (3, 0, 1)
    assert packs_listed(repo) == keep
    vm.assert_restores(path)
    assert_clean(path)


def test_orphans_go_in_one_run_with_grace_zero(path: Path) -> None:
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    keep = packs_listed(repo)
    rng = random.Random(6)
    orphan(repo, rng)
    orphan(repo, rng, index=False)
    report = prune(reopen(path), grace=0)
    assert (report.condemned_packs, report.deleted_packs, report.records_done) == (2, 2, 1)
    assert packs_listed(repo) == keep
    assert len(index_objects(repo)) == 1  # consolidated, without the deleted pack
    vm.assert_restores(path)
    assert_clean(path)


def test_an_incremental_never_dedups_against_a_blob_its_parent_view_hides(path: Path) -> None:
    """A blob only an older layer holds (a newer layer overwrote it) is not kept by a forget that merges
    the chain: the incremental stores it again instead, and commits after forget + prune deleted it."""
    repo = create(path)
    vm = Vm(repo)
    old = vm.rand(CH)
    vm.point([(0, old), (CH, vm.rand(CH))], full=True)
    parent = vm.point([(0, vm.rand(CH))])  # chunk 0 overwritten: `old` is needed by the full only
    backup = reopen(path)  # an incremental begins: what exporter/backup.py dedups against
    known = {p.blob for p in backup.resolve(backup.manifest(VM, parent), "vda") if p.blob is not None}
    assert repo.envelope.blob_id(old) not in known
    writer = backup.writer(known=known)
    m = vm.prepare([(3 * CH, old)], repo=backup, writer=writer)  # the guest wrote `old` back
    assert vm.stats is not None and (vm.stats.dedup_blobs, vm.stats.new_blobs) == (0, 1)

    forget(reopen(path), VM, Policy(last=1))  # the parent becomes a merged full without `old`
    first = prune(reopen(path), grace=HOUR, max_unused=0)
    assert (first.repacked_packs, first.condemned_packs) == (1, 2)  # the full's (repacked), the run's own
    vm.commit(m, backup, writer.packs_needed())  # within the grace
    later = prune(reopen(path), grace=HOUR, now=lambda: time.time() + HOUR + 1)
    assert (later.deleted_packs, later.rescued_packs) == (1, 1)  # `old`'s original pack goes, the run's stays
    assert reopen(path).point_ids(VM) == [parent, m.id]
    vm.assert_restores(path)


# -- 6. forget + prune ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_kept_point_restores_after_forget_and_prune(path: Path, fmt: str) -> None:
    vm = Vm(create(path, fmt))
    ids = vm.history()
    orphan(vm.repo, random.Random(7))
    result = forget(reopen(path), VM, Policy(last=3))
    assert result.removed == sorted(ids[:3], reverse=True)
    assert result.rewritten == [ids[3]]  # the oldest kept point: its chain crossed the forgotten ones
    vm.assert_restores(path)
    report = prune(reopen(path), grace=0, max_unused=0)
    # unused: chunks 0, 1, 3, 6 of the full and 6 of the third point (overwritten), the orphan
    assert (report.repacked_packs, report.condemned_packs, report.deleted_packs) == (2, 3, 3)
    assert reopen(path).point_ids(VM) == ids[3:]
    vm.assert_restores(path)
    assert_clean(path)


def test_prune_reads_every_manifest_afresh_not_from_the_handles_cache(path: Path) -> None:
    vm = Vm(create(path))
    ids = vm.history()
    long_lived = reopen(path)
    assert len(long_lived.scan(VM).points) == 6  # e.g. a listing made earlier by this process
    forget(reopen(path), VM, Policy(last=3))  # another process
    prune(long_lived, grace=0, max_unused=0)
    assert reopen(path).point_ids(VM) == ids[3:]
    vm.assert_restores(path)


# -- 7. kill safety -------------------------------------------------------------------------------------

class Killed(Exception):
    """Raised from an events hook: the process died at that moment."""


def kill_at(event: str) -> Callable[[str, dict], None]:
    def hook(name: str, detail: dict) -> None:
        if name == event:
            raise Killed(name)
    return hook


def forgotten_history(path: Path, fmt: str) -> Vm:
    """:meth:`Vm.history`, three points forgotten, an orphan pack: a prune with ``max_unused=0`` and
    ``grace=0`` then fires every one of its events."""
    vm = Vm(create(path, fmt))
    vm.history()
    orphan(vm.repo, random.Random(8))
    forget(reopen(path), VM, Policy(last=3))
    return vm


PRUNE_EVENTS = ["scanned", "repacked", "condemned", "rescanned", "indexed", "deleted"]


def test_a_prune_fires_every_event_in_order(path: Path) -> None:
    forgotten_history(path, "encrypted")
    seen: list[str] = []
    prune(reopen(path), grace=0, max_unused=0, events=lambda name, detail: seen.append(name))
    assert seen == PRUNE_EVENTS


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("event", PRUNE_EVENTS)
def test_a_prune_killed_at_any_event_leaves_every_point_and_the_next_prune_finishes(
        path: Path, event: str, fmt: str) -> None:
    vm = forgotten_history(path, fmt)
    with pytest.raises(Killed):
        prune(reopen(path), grace=0, max_unused=0, events=kill_at(event))
    vm.assert_restores(path)
    report = check.verify(reopen(path), None, None, read_data=True)
    assert report.ok, (report.repository_problems, [p.problems for p in report.points])
    repo = reopen(path)
    prune(repo, grace=0, max_unused=0)
    records = gc.read_records(repo.backend, repo.envelope)
    assert records and all(r.state == gc.DONE for r in records)
    vm.assert_restores(path)
    assert_clean(path)
    assert not reopen(path).backend.exists(LOCK_NAME)


#: (event, which occurrence): with max_chain=1 the two kept points are both rewritten, four are forgotten
FORGET_EVENTS = [("planned", 1), ("rewritten", 1), ("rewritten", 2), ("forgotten", 1), ("forgotten", 3)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("event,nth", FORGET_EVENTS)
def test_a_forget_killed_at_any_event_leaves_every_listed_point_and_runs_again(
        path: Path, event: str, nth: int, fmt: str) -> None:
    vm = Vm(create(path, fmt))
    ids = vm.history()
    count = {"n": 0}

    def hook(name: str, detail: dict) -> None:
        if name == event:
            count["n"] += 1
            if count["n"] == nth:
                raise Killed(name)

    with pytest.raises(Killed):
        forget(reopen(path), VM, Policy(last=2), max_chain=1, events=hook)
    listed = reopen(path).point_ids(VM)
    assert listed[-2:] == ids[-2:] and set(listed) <= set(ids)
    assert len(listed) == {"planned": 6, "rewritten": 6, "forgotten": 6 - nth}[event]
    vm.assert_restores(path)  # every listed point, forgotten-to-be ones too
    result = forget(reopen(path), VM, Policy(last=2), max_chain=1)
    assert sorted(result.removed) == sorted(set(listed) - set(ids[-2:]))
    assert result.rewritten == {"planned": ids[-2:], "rewritten": ids[len(ids) - 2 + nth:], "forgotten": []}[event]
    assert reopen(path).point_ids(VM) == ids[-2:]
    vm.assert_restores(path)
    prune(reopen(path), grace=0, max_unused=0)
    vm.assert_restores(path)
    assert_clean(path)


# -- 8. index consolidation -----------------------------------------------------------------------------

def test_an_index_object_written_after_prune_listed_the_index_survives_consolidation(path: Path) -> None:
    vm = forgotten_history(path, "encrypted")
    other = reopen(path)
    late: dict[str, object] = {}

    def concurrent_backup(name: str, detail: dict) -> None:
        if name == "scanned":
            before = index_objects(other)
            [blob], _ = store(other, [b"written while prune ran" * 1000])
            (late["index"],) = index_objects(other) - before
            late["blob"] = blob

    assert len(index_objects(other)) >= 7
    report = prune(reopen(path), grace=0, max_unused=1.0, events=concurrent_backup)
    assert report.deleted_packs >= 1 and report.repacked_packs == 0
    after = index_objects(other)
    assert late["index"] in after
    assert after == {*report.index, late["index"]} and len(report.index) == 1
    fresh = reopen(path)
    assert fresh.read_blob(late["blob"]) == b"written while prune ran" * 1000
    vm.assert_restores(path)


def test_consolidation_with_a_repack_leaves_at_most_two_index_objects_plus_the_concurrent_one(path: Path) -> None:
    vm = forgotten_history(path, "plain")
    other = reopen(path)
    late: list[str] = []

    def concurrent_backup(name: str, detail: dict) -> None:
        if name == "scanned":
            before = index_objects(other)
            store(other, [b"late" * 5000])
            late.extend(index_objects(other) - before)

    report = prune(reopen(path), grace=0, max_unused=0, events=concurrent_backup)
    assert report.repacked_packs >= 1
    after = index_objects(other)
    assert set(late) <= after and len(after - set(late)) <= 2 and set(report.index) <= after
    vm.assert_restores(path)


# -- 9. the maintenance lock ----------------------------------------------------------------------------

def test_a_second_prune_while_the_lock_is_held_is_refused_with_the_holder(path: Path) -> None:
    repo = create(path)
    with repo.maintenance("x"):
        with pytest.raises(LockedError) as err:
            prune(reopen(path), grace=0)
        assert err.value.holder.startswith(f"x on {socket.gethostname()} pid {os.getpid()} since ")
        with pytest.raises(LockedError):
            forget(reopen(path), VM, Policy(last=1))
        assert repo.backend.exists(LOCK_NAME)
    assert not repo.backend.exists(LOCK_NAME)
    prune(reopen(path), grace=0)


def plant_lock(repo: Repository, **fields: object) -> bytes:
    now = time.time()
    doc = {"purpose": "prune", "host": socket.gethostname(), "pid": os.getpid(), "nonce": "planted",
           "created": now, "refreshed": now, "expires": now + STALE, **fields}
    data = repo.envelope.seal_record(LOCK_NAME, doc)
    repo.backend.put(LOCK_NAME, data)
    return data


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(path: Path) -> None:
    repo = create(path)
    plant_lock(repo, pid=dead_pid())
    prune(reopen(path), grace=0)
    assert not repo.backend.exists(LOCK_NAME)


def test_a_lock_of_a_live_process_elsewhere_is_taken_over_only_once_expired(path: Path) -> None:
    repo = create(path)
    plant_lock(repo, host="another-host", pid=1)
    with pytest.raises(LockedError):
        MaintenanceLock(repo.backend, repo.envelope, "prune").acquire()
    later = MaintenanceLock(repo.backend, repo.envelope, "prune", now=lambda: time.time() + STALE + 1)
    with later:
        assert repo.envelope.open_record(LOCK_NAME, repo.backend.get(LOCK_NAME))["nonce"] == later._nonce


def test_an_expired_holder_releasing_late_leaves_the_new_holders_lock(path: Path) -> None:
    repo = create(path)
    first = MaintenanceLock(repo.backend, repo.envelope, "prune")
    first.acquire()
    second = MaintenanceLock(repo.backend, repo.envelope, "forget", now=lambda: time.time() + STALE + 1)
    second.acquire()
    first.release()
    assert repo.envelope.open_record(LOCK_NAME, repo.backend.get(LOCK_NAME))["nonce"] == second._nonce
    second.release()
    assert not repo.backend.exists(LOCK_NAME)


def test_a_failed_taker_never_deletes_a_live_lock(path: Path) -> None:
    repo = create(path)
    live = plant_lock(repo, host="another-host", pid=1)
    for _ in range(3):
        with pytest.raises(LockedError):
            MaintenanceLock(repo.backend, repo.envelope, "prune").acquire()
        assert repo.backend.get(LOCK_NAME) == live


class SwapOnSecondRead(BackendWrapper):
    """The lock a taker finds stale is replaced by a racing taker's live one right after the first read."""

    def __init__(self, inner: Backend, live: bytes) -> None:
        super().__init__(inner)
        self.live = live
        self.reads = 0

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        if name == LOCK_NAME:
            self.reads += 1
            if self.reads == 1:
                self.inner.put(LOCK_NAME, self.live)
        return data


def test_a_taker_rechecks_a_stale_lock_before_deleting_it(path: Path) -> None:
    repo = create(path)
    plant_lock(repo, host="another-host", pid=1, expires=time.time() - 1)
    live = repo.envelope.seal_record(LOCK_NAME, {"purpose": "forget", "host": "another-host", "pid": 1,
                                                 "nonce": "racer", "created": time.time(),
                                                 "refreshed": time.time(), "expires": time.time() + STALE})
    racing = SwapOnSecondRead(repo.backend, live)
    with pytest.raises(LockedError):
        MaintenanceLock(racing, repo.envelope, "prune").acquire()
    assert repo.backend.get(LOCK_NAME) == live


# -- 10. plan_merges, by property -----------------------------------------------------------------------

DISK = 96  #: bytes per synthetic disk


@st.composite
def vm_histories(draw: st.DrawFn) -> tuple[list[Manifest], dict[bytes, bytes], set[str], int]:
    """A VM's manifests (1-3 disks; fulls, incrementals with ZERO entries, ``--disk`` points holding some
    disks with per-disk parents), the blobs' contents, a forget set (never the newest) and a max_chain."""
    rng = draw(st.randoms(use_true_random=False))
    disks = [f"d{i}" for i in range(draw(st.integers(1, 3)))]
    blobs: dict[bytes, bytes] = {}
    latest: dict[str, str] = {}
    points: list[Manifest] = []
    for i in range(draw(st.integers(1, 7))):
        pid = f"2026{i:02d}"
        held = draw(st.lists(st.sampled_from(disks), min_size=1, unique=True))
        records = {}
        for disk in sorted(held):
            full = disk not in latest or draw(st.booleans()) and draw(st.booleans())
            records[disk] = DiskRecord(kind="full" if full else "incremental", virtual_size=DISK,
                                       extents=draw_extents(draw, rng, blobs),
                                       parent=None if full else latest[disk])
        parents = sorted(r.parent for r in records.values() if r.parent)
        parent = parents[-1] if parents else None
        for disk, r in records.items():  # older manifests name no per-disk parent when it is the point's
            if r.parent is not None and r.parent == parent and draw(st.booleans()):
                records[disk] = DiskRecord(kind=r.kind, virtual_size=DISK, extents=r.extents)
        points.append(Manifest(id=pid, vm=VM, created=f"2026-01-01T00:00:{i:02d}Z", parent=parent,
                               kind="incremental" if parents else "full", disks=records))
        latest.update(dict.fromkeys(records, pid))
    older = [m.id for m in points[:-1]]
    gone = set(draw(st.lists(st.sampled_from(older), unique=True))) if older else set()
    return points, blobs, gone, draw(st.integers(1, 4))


def draw_extents(draw: st.DrawFn, rng: random.Random, blobs: dict[bytes, bytes]) -> list:
    cuts = sorted(set(draw(st.lists(st.integers(0, DISK), max_size=8))))
    out = []
    for a, b in zip(cuts, cuts[1:]):
        what = draw(st.sampled_from(["gap", "zero", "data", "data"]))
        if what == "zero":
            out.append((a, b - a, None))
        elif what == "data":
            content = rng.randbytes(b - a)
            ident = bytes([len(blobs) % 256]) + content[:1] + len(blobs).to_bytes(30, "little")
            blobs[ident] = content
            out.append((a, b - a, ident))
    return out


def view(world: dict[str, Manifest], pid: str) -> dict[str, Manifest]:
    """``Repository.point_view``'s rule: each disk any point up to *pid* holds, at the newest such point."""
    out: dict[str, Manifest] = {}
    for i in sorted(world):
        if i <= pid:
            out.update(dict.fromkeys(world[i].disks, world[i]))
    return out


def chain(world: dict[str, Manifest], top: Manifest, disk: str) -> list[Manifest]:
    layers = [top]
    while layers[-1].disks[disk].kind != "full":
        parent = layers[-1].disk_parent(disk)
        assert parent in world, f"the chain of {disk} at {top.id} crosses {parent}, which is not in this world"
        assert disk in world[parent].disks
        layers.append(world[parent])
        assert len(layers) <= len(world)
    return layers


def disk_bytes(layers: list[Manifest], disk: str, blobs: dict[bytes, bytes]) -> bytes:
    out = bytearray(DISK)
    for p in resolve([m.disks[disk].extents for m in layers], [m.disks[disk].skips for m in layers]):
        if p.blob is not None:
            piece = blobs[p.blob][p.skip:p.skip + p.length]
            assert len(piece) == p.length, "a skip points past the end of its blob"
            out[p.offset:p.offset + p.length] = piece
    return bytes(out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vm_histories())
def test_plan_merges_keeps_every_kept_point_byte_exact(history) -> None:
    points, blobs, gone, max_chain = history
    rewrites = plan_merges(points, gone, max_chain)
    assert set(rewrites) <= {m.id for m in points} - gone
    old = {m.id: m for m in points}
    new = {m.id: rewrites.get(m.id, m) for m in points if m.id not in gone}
    for pid, m in rewrites.items():
        assert (m.id, m.vm, m.created) == (pid, old[pid].vm, old[pid].created)
        assert Manifest.from_bytes(m.to_bytes(), pid) == m
    for pid in new:
        before, after = view(old, pid), view(new, pid)
        assert after.keys() == before.keys()
        for disk in before:
            layers = chain(new, after[disk], disk)  # never through a forgotten point
            assert len(layers) <= max_chain
            assert disk_bytes(layers, disk, blobs) == disk_bytes(chain(old, before[disk], disk), disk, blobs)


def test_manifests_with_skips_round_trip_and_say_format_2(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = bytes([1]) * 32, bytes([2]) * 32
    merged = DiskRecord(kind="full", virtual_size=1000, extents=[(0, 10, a), (10, 5, None), (20, 30, b)],
                        skips={0: 7, 20: 123})
    plain = DiskRecord(kind="full", virtual_size=1000, extents=[(0, 10, a)])
    m = Manifest(id="p1", vm=VM, created="2026-01-01T00:00:00Z", parent=None, kind="full",
                 disks={"vda": merged, "vdb": plain})
    back = Manifest.from_bytes(m.to_bytes(), "here")
    assert back == m and back.disks["vda"].skips == {0: 7, 20: 123} and back.disks["vdb"].skips == {}
    body = json.loads(m.to_bytes())["manifest"]
    assert body["format"] == 2 and body["disks"]["vda"]["extent_layout"] == 2
    assert "extent_layout" not in body["disks"]["vdb"]
    unmerged = Manifest(id="p1", vm=VM, created="2026-01-01T00:00:00Z", parent=None, kind="full",
                        disks={"vdb": plain})
    assert json.loads(unmerged.to_bytes())["manifest"]["format"] == 1
    monkeypatch.setattr(manifest_mod, "FORMATS", (1,))  # a fleece that predates merges
    Manifest.from_bytes(unmerged.to_bytes(), "old")
    with pytest.raises(IntegrityError, match="upgrade fleece"):
        Manifest.from_bytes(m.to_bytes(), "new")


# -- 11. delete_many --------------------------------------------------------------------------------------

NAMES = ["data/ab/one", "data/ab/two", "index/three", "points/x/four", "config-ish"]


def test_delete_many_on_the_local_backend_removes_exactly_the_names_given(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "b", create=True)
    for name in NAMES:
        backend.put(name, name.encode())
    backend.delete_many(["data/ab/two", "index/three", "never/was", "data/ab/two"])
    assert sorted(i.name for i in backend.list()) == sorted(set(NAMES) - {"data/ab/two", "index/three"})
    backend.delete_many([])
    assert len(list(backend.list())) == 3


def test_delete_many_through_the_wrapped_stack_counts_one_request_per_local_name(tmp_path: Path) -> None:
    stack = open_backend(str(tmp_path / "b"), create=True)
    for name in NAMES:
        stack.put(name, name.encode())
    counting = layer(stack, Counting)
    assert counting is not None
    stack.delete_many(["points/x/four", "missing/one", "data/ab/one"])
    assert counting.requests()["DELETE"] == 3
    stack.delete_many([])
    assert counting.requests()["DELETE"] == 3
    assert sorted(i.name for i in stack.list()) == sorted(set(NAMES) - {"points/x/four", "data/ab/one"})


def test_a_repack_leaves_duplicated_blobs_in_the_packs_that_stay_so_the_next_prune_finds_nothing(path: Path) -> None:
    """Racing backups store the same blob twice. A pack being repacked whose needed blobs all have a copy
    in a pack that stays is not written again: a new pack holding only duplicates would be chosen for no
    blob by the next prune (packs are ranked by the needed bytes they hold) and condemned again — found
    by the prune torture, whose final two prunes must reach a fixed point."""
    repo = create(path, "plain")
    rng = random.Random(5)
    x, y, z, *rest = [rng.randbytes(CH) for _ in range(13)]
    units, a, w, v = rest[:5], rest[5:8], rest[8], rest[9]  # 3 + 5 + 3 + 2 random chunks
    s1, s2 = rng.randbytes(1000), rng.randbytes(1000)

    def pack(blobs: list[bytes]) -> list[bytes]:
        return store(repo, blobs, repo.writer(known=set()))[0]  # no dedup: the duplicates racing runs make

    ids = {}
    for blobs in ([x, y, z, *units], [z, *a], [x, w, s1], [y, v, s2]):
        ids.update(zip(blobs, pack(blobs)))
    needed = [x, y, z, *a, w, s1, v, s2]  # not the five units: 6 of the first pack's 8 blobs are unused
    extents = [(i * CH, len(b), ids[b]) for i, b in enumerate(needed)]
    size = len(needed) * CH
    m = Manifest(id=new_point_id(T0), vm=VM, created=stamp(T0), parent=None, kind="full",
                 disks={"vda": DiskRecord(kind="full", virtual_size=size, extents=extents)})
    repo.commit(m)

    first = prune(reopen(path), grace=0, max_unused=0.3)
    assert (first.repacked_packs, first.condemned_packs, first.deleted_packs) == (1, 1, 1)
    assert first.repacked_bytes == 0  # x and y have copies in the packs that stay: nothing written again
    second = prune(reopen(path), grace=0, max_unused=0.3)
    assert (second.repacked_packs, second.condemned_packs) == (0, 0), second
    disk = bytearray(size)
    for i, b in enumerate(needed):
        disk[i * CH:i * CH + len(b)] = b
    fresh = reopen(path)
    assert materialize(fresh, fresh.manifest(VM, m.id), "vda") == bytes(disk)
    assert_clean(path)


def test_a_rescued_pack_is_repacked_in_the_same_prune_so_the_next_prune_finds_nothing(path: Path) -> None:
    """A condemned pack that a point committed in the grace needs is rescued — but it was condemned for
    being unused, so most of it is still garbage. Kept whole, the next prune (which no longer sees it as
    condemned) would repack it and condemn it again: prune would not reach a fixed point in one run
    (found by the prune torture). The prune whose grace ends treats such a pack as the live pack it is
    about to become: ranked and repacked like any other, so only the needed blob is written again."""
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    content = vm.rand(CH)
    [blob, *_], _ = store(repo, [content] + [vm.rand(CH) for _ in range(3)])  # a run that never committed
    pack = repo.load_index().lookup(blob).pack
    backup = reopen(path)  # loaded the index before the prune: deduplicates against the pack
    m = vm.prepare([(2 * CH, content)], repo=backup)
    first = prune(reopen(path), grace=HOUR)
    assert (first.condemned_packs, first.deleted_packs) == (1, 0)
    vm.commit(m, backup)  # in the grace: allowed
    (record,) = gc.read_records(repo.backend, repo.envelope)
    second = prune(reopen(path), grace=HOUR, now=lambda: record.deadline)
    assert (second.repacked_packs, second.rescued_packs, second.deleted_packs) == (1, 0, 1), second
    assert second.condemned_packs == 0  # the condemned pack is not condemned twice
    assert pack not in packs_listed(reopen(path))
    third = prune(reopen(path), grace=HOUR, now=lambda: record.deadline + 1)
    assert (third.repacked_packs, third.condemned_packs, third.rescued_packs) == (0, 0, 0), third
    vm.assert_restores(path)
    assert_clean(path)


def killed_repack(repo: Repository, blobs: list[bytes]) -> str:
    """What a prune killed in its repack leaves: a pack holding copies of *blobs* (read back and written
    again, as the repack does) and no index object naming it (the kill came between the pack's upload
    and the writer's index). Returns that pack's id."""
    return unindexed_pack(repo, [repo.read_blob(b) for b in blobs])[0]


def needed_blobs(repo: Repository) -> set[bytes]:
    return {b for vm in repo.vms() for m in repo.scan(vm).points for rec in m.disks.values()
            for _, _, b in rec.extents if b is not None}


def assert_indexed(path: Path) -> None:
    """Every blob a listed point needs is located by a fresh handle's index in a pack that exists."""
    repo = reopen(path)
    index, listed = repo.load_index(), packs_listed(repo)
    missing = [b.hex()[:16] for b in needed_blobs(repo) if index.lookup(b) is None]
    assert not missing, f"{len(missing)} needed blob(s) in no index object: {missing[:5]}"
    assert all(index.lookup(b).pack in listed for b in needed_blobs(repo))


@pytest.mark.parametrize("grace", [0.0, HOUR])
def test_a_pack_no_index_names_never_keeps_a_needed_blob_alone(path: Path, grace: float) -> None:
    """A prune killed in its repack leaves a pack in no index object holding copies of needed blobs of
    several packs — more needed bytes than any one of them. Ranked by needed bytes alone, it was the
    next prune's choice to keep them: the packs the index locates them in became unused, were condemned and
    deleted, and the points' blobs were in no index object (found by the prune torture; a restore fails
    until rebuild-index). Packs no index names are chosen last, and their copies never spare a pack."""
    vm = Vm(create(path, "plain"))
    vm.history()
    repo = reopen(path)
    killed_repack(repo, sorted(needed_blobs(repo)))
    first = prune(reopen(path), grace=grace, max_unused=1.0)
    assert first.condemned_packs == 1 and first.adopted_packs == 0, first
    assert_indexed(path)
    if grace:
        (record,) = gc.read_records(repo.backend, repo.envelope)
        second = prune(reopen(path), grace=grace, max_unused=1.0, now=lambda: record.deadline)
        assert (second.deleted_packs, second.rescued_packs, second.condemned_packs) == (1, 0, 0), second
        assert_indexed(path)
    vm.assert_restores(path)
    assert_clean(path)


def test_a_pack_whose_index_object_was_lost_is_indexed_again_by_prune(path: Path) -> None:
    """The index object of a committed point's pack is gone (deleted by hand): its blobs are in no index
    object, so no restore finds them, though the pack holds them. Prune, which reads such a pack's own
    table, keeps it for those blobs and writes an index object naming it before anything else."""
    vm = Vm(create(path, "plain"))
    vm.history()
    before = index_objects(vm.repo)
    last = vm.point([(3 * CH, vm.rand(CH)), (5 * CH + 9, vm.rand(999))])
    (lost,) = index_objects(vm.repo) - before
    vm.repo.backend.delete(lost)
    with pytest.raises(IntegrityError):
        vm.assert_restores(path, [last])
    first = prune(reopen(path), grace=HOUR)
    assert first.adopted_packs == 1 and first.condemned_packs == 0, first
    assert_indexed(path)
    vm.assert_restores(path)
    second = prune(reopen(path), grace=HOUR)
    assert (second.adopted_packs, second.condemned_packs, second.repacked_packs) == (0, 0, 0), second
    assert_clean(path)


class BeforeListing(BackendWrapper):
    """Runs *act* once, right before the first listing of *prefix* goes through."""

    def __init__(self, inner: Backend, prefix: str, act: Callable[[], None]) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.act: Callable[[], None] | None = act

    def list(self, prefix: str = ""):
        if prefix == self.prefix and self.act is not None:
            act, self.act = self.act, None
            act()
        return self.inner.list(prefix)


def test_a_copy_indexed_during_the_prune_spares_the_condemned_pack(path: Path) -> None:
    """A backup's pack lands before prune lists data/, its index object after prune listed index/, its
    manifest before the deleting phase reads the points again: the pack is in no index object the scan
    read, yet it holds the new point's blob. The deleting phase reads the index objects written since
    the scan, so that copy counts and the condemned pack holding the same blob goes (no needless rescue)."""
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    content = vm.rand(CH)
    store(repo, [content])  # a run that never committed: its pack is unused
    assert prune(reopen(path), grace=HOUR).condemned_packs == 1
    (record,) = gc.read_records(repo.backend, repo.envelope)
    backup = reopen(path)  # loads the record: stores the blob again rather than rely on the condemned pack

    def commit_meanwhile() -> None:
        vm.commit(vm.prepare([(2 * CH, content)], repo=backup), backup)

    pruner = reopen(path)
    pruner.backend = BeforeListing(pruner.backend, "data/", commit_meanwhile)
    second = prune(pruner, grace=HOUR, now=lambda: record.deadline)
    assert (second.rescued_packs, second.deleted_packs, second.adopted_packs) == (0, 1, 0), second
    assert not set(record.packs) & packs_listed(reopen(path))
    assert_indexed(path)
    vm.assert_restores(path)
    assert_clean(path)


class KilledOnPut(BackendWrapper):
    """The process dies (``Killed``) when it first writes an object under *prefix*: what a SIGKILL
    between a repack's pack uploads and its writer's index object leaves."""

    def __init__(self, inner: Backend, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix

    def put(self, name: str, data) -> None:
        if name.startswith(self.prefix):
            raise Killed(name)
        self.inner.put(name, data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prune_killed_between_its_repacked_packs_and_their_index_leaves_the_next_prune_exact(
        path: Path, fmt: str) -> None:
    vm = forgotten_history(path, fmt)
    pruner = reopen(path)
    pruner.backend = KilledOnPut(pruner.backend, "index/")
    with pytest.raises(Killed):
        prune(pruner, grace=0, max_unused=0)
    assert set(reopen(path).backend.list("data/")), "the repack uploaded its packs"
    vm.assert_restores(path)
    for max_unused in (1.0, 0.0):
        prune(reopen(path), grace=0, max_unused=max_unused)
        assert_indexed(path)
        vm.assert_restores(path)
    assert_clean(path)


# -- 11. review: stale entries, adoption, one clock ------------------------------------------------------

def indexed_packs(repo: Repository) -> dict[str, set[str]]:
    """Index object → the packs it names."""
    out = {}
    for name in sorted(index_objects(repo)):
        records = decode_index(name.split("/", 1)[1], repo.backend.get(name), repo.envelope.meta)
        out[name] = {r[0] for r in records}
    return out


def assert_index_names_only_listed_packs(path: Path) -> None:
    repo = reopen(path)
    listed = packs_listed(repo)
    stale = {n: sorted(p[:12] for p in ps - listed) for n, ps in indexed_packs(repo).items() if ps - listed}
    assert not stale, f"index objects naming deleted packs: {stale}"


def commit_point(repo: Repository, blobs: list[tuple[bytes, int]]) -> None:
    """A full point whose extents are (blob id, length), one chunk each."""
    extents = [(i * CH, n, b) for i, (b, n) in enumerate(blobs)]
    m = Manifest(id=new_point_id(T0), vm=VM, created=stamp(T0), parent=None, kind="full",
                 disks={"vda": DiskRecord(kind="full", virtual_size=len(blobs) * CH, extents=extents)})
    repo.commit(m, set())


class BeforePut(BackendWrapper):
    """Runs *act* once, right before the first put under *prefix* goes through."""

    def __init__(self, inner: Backend, prefix: str, act: Callable[[], None]) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.act: Callable[[], None] | None = act

    def put(self, name: str, data) -> None:
        if name.startswith(self.prefix) and self.act is not None:
            act, self.act = self.act, None
            act()
        self.inner.put(name, data)


def slow_backup_refused(path: Path) -> tuple[Vm, bytes, float]:
    """A backup's writer uploads its packs as it goes and writes its index object at flush. A run longer
    than the grace: prune 1 condemns its (still unindexed) pack, prune 2 deletes it after the grace, then
    the run writes its index object naming it and is refused at commit (as designed): that index object
    names a deleted pack. Returns the VM, the refused blob's content and the clock of prune 1."""
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    t = time.time()
    content = vm.rand(CH)

    def prunes_meanwhile() -> None:
        p1 = prune(reopen(path), grace=HOUR, now=lambda: t)
        assert p1.condemned_packs == 1, p1
        p2 = prune(reopen(path), grace=HOUR, now=lambda: t + HOUR)
        assert p2.deleted_packs == 1, p2

    slow = reopen(path)
    slow.backend = BeforePut(slow.backend, "index/", prunes_meanwhile)
    m = vm.prepare([(2 * CH, content)], repo=slow)
    with pytest.raises(PruneConflict):
        vm.commit(m, slow)
    return vm, content, t


def test_the_index_entry_of_a_refused_backup_naming_a_deleted_pack_is_dropped_by_the_next_prune(
        path: Path) -> None:
    """Consolidation copied every indexed pack, listed or not: the refused run's entry for the deleted
    pack went into every consolidated index object from then on (found by review)."""
    _, _, t = slow_backup_refused(path)
    with pytest.raises(AssertionError, match="index objects naming deleted packs"):
        assert_index_names_only_listed_packs(path)
    third = prune(reopen(path), grace=HOUR, now=lambda: t + HOUR + 1)
    assert third.index, "a gone pack's entry forces a consolidation"
    assert_index_names_only_listed_packs(path)


def test_once_the_done_record_expires_no_backup_dedups_against_the_deleted_pack(path: Path) -> None:
    """Had the refused run's entry survived the record's expiry, the VM's next backup (its bitmap still
    holds the change) would deduplicate against the deleted pack, pass the commit guard (no record names
    it any more) and commit a point that does not restore. It stores the blob again and restores."""
    vm, content, t = slow_backup_refused(path)
    prune(reopen(path), grace=HOUR, now=lambda: t + HOUR + 1)
    expiring = prune(reopen(path), grace=HOUR, now=lambda: t + HOUR + gc.KEEP_DONE + HOUR + 1)
    assert expiring.records_removed == 1, expiring
    again = reopen(path)
    m2 = vm.prepare([(2 * CH, content)], repo=again)
    assert vm.stats is not None and (vm.stats.dedup_blobs, vm.stats.new_blobs) == (0, 1)
    vm.commit(m2, again)
    vm.assert_restores(path)
    assert_indexed(path)


def test_a_record_stays_while_an_index_object_written_during_the_prune_names_its_deleted_pack(
        path: Path) -> None:
    """The refused run's index object lands while the prune that expires the record runs (after it listed
    index/): too late for its consolidation. The record stays, so a backup deduplicating against the
    entry is still refused; the next prune drops the entry and then the record."""
    vm, content, t = slow_backup_refused(path)
    repo = reopen(path)
    (stale,) = [n for n, packs in indexed_packs(repo).items() if packs - packs_listed(repo)]
    data = repo.backend.get(stale)
    repo.backend.delete(stale)
    late = t + HOUR + gc.KEEP_DONE + HOUR + 1
    pruner = reopen(path)
    pruner.backend = BeforeListing(pruner.backend, "data/", lambda: repo.backend.put(stale, data))
    first = prune(pruner, grace=HOUR, now=lambda: late)
    assert first.records_removed == 0, first
    assert [r.state for r in gc.read_records(repo.backend, repo.envelope)] == [gc.DONE]
    second = prune(reopen(path), grace=HOUR, now=lambda: late + 1)
    assert second.records_removed == 1, second
    assert_index_names_only_listed_packs(path)


def test_a_prune_that_adopts_a_pack_chooses_again_so_the_next_prune_finds_nothing(path: Path) -> None:
    """Blob y is in indexed pack A and in pack O whose index object was lost; x only in O. Indexed packs
    rank first, so y was kept in A and x in O, adopting O; the next prune, seeing O indexed with more
    needed bytes than A, kept y in O and condemned A (found by review). The prune that adopts chooses
    again: A is condemned at once, and the next prune finds nothing."""
    repo = create(path, "plain")
    rng = random.Random(3)
    x, y = rng.randbytes(CH), rng.randbytes(1000)
    [yid], _ = store(repo, [y])  # pack A, indexed
    _, (xid, _) = unindexed_pack(repo, [x, y])  # pack O, index object lost
    commit_point(repo, [(xid, CH), (yid, 1000)])
    first = prune(reopen(path), grace=HOUR)
    assert first.adopted_packs == 1 and first.condemned_packs == 1, first
    assert_indexed(path)
    second = prune(reopen(path), grace=HOUR)
    assert (second.condemned_packs, second.repacked_packs, second.adopted_packs) == (0, 0, 0), second


def test_an_adopted_pack_repacked_and_deleted_in_one_run_is_named_by_no_index_object(path: Path) -> None:
    """The adoption's index object is one of the run's index objects: the consolidation that drops the
    deleted pack replaces it too (it survived, and a fresh reader located x in the deleted pack)."""
    repo = create(path, "plain")
    rng = random.Random(4)
    base, x, g = rng.randbytes(CH), rng.randbytes(CH), rng.randbytes(CH)
    [bid], _ = store(repo, [base])
    _, (xid, _) = unindexed_pack(repo, [x, g])  # g: garbage
    commit_point(repo, [(bid, CH), (xid, CH)])
    report = prune(reopen(path), grace=0, max_unused=0)
    assert (report.adopted_packs, report.repacked_packs, report.deleted_packs) == (1, 1, 1), report
    fresh = reopen(path)
    assert materialize(fresh, fresh.manifest(VM, fresh.point_ids(VM)[0]), "vda") == base + x
    assert_index_names_only_listed_packs(path)
    assert_clean(path)


def test_a_revived_pack_no_index_names_adopted_repacked_and_deleted_leaves_no_entry(path: Path) -> None:
    """A condemned pack whose grace is over, needed by a point committed in the grace, and named by no
    index object: revived, adopted, repacked and deleted in one run — and named by no index object after."""
    repo = create(path, "plain")
    rng = random.Random(5)
    base, x, g = rng.randbytes(CH), rng.randbytes(CH), rng.randbytes(CH)
    [bid], _ = store(repo, [base])
    pack, (xid, _) = unindexed_pack(repo, [x, g])
    commit_point(repo, [(bid, CH), (xid, CH)])  # committed in the grace of the record below
    now = time.time()
    gc.write_record(repo.backend, repo.envelope, gc.new_record([pack], HOUR, "elsewhere", now - 2 * HOUR))
    report = prune(reopen(path), grace=HOUR, max_unused=0, now=lambda: now)
    assert report.adopted_packs == 1 and report.deleted_packs == 1, report
    assert pack not in packs_listed(reopen(path))
    assert_indexed(path)
    assert_index_names_only_listed_packs(path)


def test_a_deadline_passing_during_the_prune_waits_for_the_next_prune(path: Path) -> None:
    """The grace of a record ends while a prune runs: due for its deleting phase but not for its choice,
    the pack a point committed in the grace needs was rescued whole (not repacked) and the next prune
    repacked and condemned it (found by review). One clock per run: the record waits for the next prune,
    which repacks and deletes it, and the one after finds nothing."""
    repo = create(path)
    vm = Vm(repo)
    vm.point([(0, vm.rand(CH))], full=True)
    content = vm.rand(CH)
    store(repo, [content] + [vm.rand(CH) for _ in range(3)])  # a run that never committed
    backup = reopen(path)
    m = vm.prepare([(2 * CH, content)], repo=backup)
    assert prune(reopen(path), grace=HOUR).condemned_packs == 1
    vm.commit(m, backup)  # in the grace
    (record,) = gc.read_records(repo.backend, repo.envelope)
    calls = {"n": 0}

    def clock() -> float:  # the run starts a second before the deadline, the rest happens after it
        calls["n"] += 1
        return record.deadline - 1 if calls["n"] == 1 else record.deadline

    second = prune(reopen(path), grace=HOUR, now=clock)
    assert (second.rescued_packs, second.deleted_packs, len(second.waiting)) == (0, 0, 1), second
    third = prune(reopen(path), grace=HOUR, now=lambda: record.deadline + 1)
    assert (third.repacked_packs, third.rescued_packs, third.deleted_packs) == (1, 0, 1), third
    fourth = prune(reopen(path), grace=HOUR, now=lambda: record.deadline + 2)
    assert (fourth.repacked_packs, fourth.condemned_packs) == (0, 0), fourth
    vm.assert_restores(path)
    assert_clean(path)


def test_of_two_condemned_copies_of_a_blob_the_rescue_keeps_the_one_the_choice_kept(path: Path) -> None:
    """Blob b is in two condemned packs, D1 = {b, c} and D2 = {b, garbage}, and a point committed in the
    grace needs b and c. The choice keeps both in D1; the rescue went through the doomed packs by name,
    so when D2 came first it was rescued for b, then D1 for c — and the next prune condemned D2, which it
    chooses for nothing (no fixed point: found by the prune torture)."""
    repo = create(path, "plain")
    rng = random.Random(9)
    b, c = rng.randbytes(CH), rng.randbytes(CH)
    (bid, cid), _ = store(repo, [b, c], repo.writer(known=set()))  # D1: a run that never committed
    d1 = repo.load_index(refresh=True).lookup(cid).pack
    while True:  # D2, named before D1 (pack ids are content hashes: draw garbage until it is)
        before = index_objects(repo)
        _, _ = store(repo, [b, rng.randbytes(CH)], reopen(path).writer(known=set()))
        (made,) = index_objects(repo) - before
        (d2,) = {r[0] for r in decode_index(made.split("/", 1)[1], repo.backend.get(made), repo.envelope.meta)}
        if d2 < d1:
            break
        repo.backend.delete(made)
        repo.backend.delete(pack_name(d2))
    assert prune(reopen(path), grace=HOUR).condemned_packs == 2
    commit_point(reopen(path), [(bid, CH), (cid, CH)])  # in the grace
    (record,) = gc.read_records(repo.backend, repo.envelope)
    second = prune(reopen(path), grace=HOUR, max_unused=1.0, now=lambda: record.deadline)
    assert (second.rescued_packs, second.deleted_packs) == (1, 1), second
    assert packs_listed(reopen(path)) == {d1}
    third = prune(reopen(path), grace=HOUR, max_unused=1.0, now=lambda: record.deadline + 1)
    assert (third.condemned_packs, third.repacked_packs) == (0, 0), third
    assert_indexed(path)
    assert_clean(path)
