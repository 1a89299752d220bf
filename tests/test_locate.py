"""Locating blobs without loading the index: a restore's memory and time follow the point, not the
repository (``Repository.locate_many``, ``index.find_entries``).

``find_entries`` searches an index object's bytes for a few ids and walks its entries for many: both give
exactly the same entries of a real index object, ids planted where no entry starts included. A restore
of hundreds of blobs per layer (flat raw, flat qcow2, chain, ``--verify-only``) never loads the index:
it reads its points' hint objects, one at a time, and nothing else; after a prune consolidated the index
(every hint gone) it reads each index object once per disk and still restores bit-exact. A blob in a pack
a prune condemned and in a live one is located in the live one, whichever comes first.

Repositories are built by hand at the API like tests/test_resume.py does (blobs by ``Repository.writer``,
manifests by ``Repository.commit`` naming their run's index object as a backup does); the restores are the
real thing (qemu-nbd for overlays) and are compared byte for byte with the truth kept in memory.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from checks import identical
from fleece.repository import DiskRecord, IntegrityError, Manifest, RepoConfig, Repository, new_point_id
from fleece.repository import index as index_mod
from fleece.repository.backends import Backend, BackendWrapper
from fleece.repository.crypto import PACK_HEADER_SIZE, MasterKey
from fleece.repository.index import MAGIC, decode_index, encode_index, find_entries
from fleece.repository.pack import ENTRY_SIZE, PackEntry
from fleece.repository.prune import prune
from fleece.restore.restore import RestoreRequest, run_restore
from test_gc import HOUR, Listing, create, reopen, store

MiB = 1 << 20
CH = 64 << 10  #: chunk size: a few hundred blobs per layer in a 25 MiB disk
SIZE = 400 * CH
VM = "locvm"
T0 = time.time() - 30 * 86400


# -- find_entries -------------------------------------------------------------------------------------------

def _entries(rnd: random.Random, n: int) -> list[PackEntry]:
    return [PackEntry(rnd.randbytes(32), rnd.randrange(1 << 40), rnd.randrange(1 << 24), rnd.randrange(1 << 24),
                      rnd.randrange(3)) for _ in range(n)]


def _crafted(rnd: random.Random, meta: object) -> tuple[list[tuple[str, list[PackEntry], bytes]], set[bytes]]:
    """Forty packs of random entries (and an empty one), plus ids that also occur where no entry starts:
    a window across two entries (also a real entry elsewhere), a pack's own id (also a blob's), a window
    inside a pack's sealed key (format 2), one id in two packs. Returns the records and those ids."""
    packs = [(rnd.randbytes(32).hex(), _entries(rnd, rnd.randrange(1, 120)), b"") for _ in range(40)]
    first = packs[3][1]
    across = (first[5].encode() + first[6].encode())[20:52]  # the tail of one id and the fields after it
    inside = (first[7].encode() + first[8].encode())[ENTRY_SIZE - 7:ENTRY_SIZE + 25]  # across two ids
    twice = packs[9][1][0].id
    planted = {across, inside, twice, packs[11][1][2].id}
    packs[20][1].append(PackEntry(across, 1, 2, 3, 1))  # the same bytes, this time at an entry start
    packs[21][1].insert(0, PackEntry(twice, 4, 5, 6, 1))
    packs.append((packs[11][1][2].id.hex(), _entries(rnd, 3), b""))  # a pack named like a blob
    packs.append((rnd.randbytes(32).hex(), [], b""))
    if meta is not None:  # format 2: each pack's sealed key, one holding a wanted id
        hidden = packs[30][1][1].id
        packs = [(p, e, rnd.randbytes(PACK_HEADER_SIZE)) for p, e, _ in packs]
        p, e, _ = packs[2]
        packs[2] = (p, e, rnd.randbytes(10) + hidden + rnd.randbytes(PACK_HEADER_SIZE - 42))
        planted.add(hidden)
    return packs, planted


def _found(index_id: str, data: bytes, meta: object, wanted: set[bytes]) -> Counter:
    return Counter((p, e.encode(), h) for p, e, h in find_entries(index_id, data, meta, wanted))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["plain", "encrypted"])
def test_find_entries_walking_the_entries_finds_exactly_what_searching_the_bytes_finds(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(7)
    meta = MasterKey.generate().meta if fmt == "encrypted" else None
    packs, planted = _crafted(rnd, meta)
    index_id, data = encode_index(packs, meta)  # type: ignore[arg-type]
    records = decode_index(index_id, data, meta)  # type: ignore[arg-type]
    every = [e.id for _, entries, _ in records for e in entries]
    absent = {rnd.randbytes(32) for _ in range(30)}
    cases = [set(every[:1]), planted, set(every[:index_mod.FIND_MAX]), set(every[:index_mod.FIND_MAX + 1]),
             set(rnd.sample(every, 500)) | planted | absent, set(every) | absent, absent]
    for wanted in cases:
        truth = Counter((p, e.encode(), h) for p, entries, h in records for e in entries if e.id in wanted)
        monkeypatch.setattr(index_mod, "FIND_MAX", 1 << 30)  # always bytes.find
        searched = _found(index_id, data, meta, wanted)
        monkeypatch.setattr(index_mod, "FIND_MAX", 0)  # always the walk
        walked = _found(index_id, data, meta, wanted)
        monkeypatch.undo()
        assert searched == walked == truth
        assert _found(index_id, data, meta, wanted) == truth  # the mode its size chooses
    # what was planted where no entry starts is found only where one does
    across, twice = sorted(planted & {e.id for e in packs[20][1]}), packs[21][1][0].id
    assert sum(_found(index_id, data, meta, set(across)).values()) == 1
    assert sum(_found(index_id, data, meta, {twice}).values()) == 2  # two packs hold it: both


@pytest.mark.parametrize("damage, words", [("count", "truncated inside its tables"),
                                           ("trailing", "trailing bytes")])
def test_find_entries_says_the_same_about_a_damaged_index_object_in_both_modes(
        damage: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(8)
    entries = _entries(rnd, 40)
    body = struct.pack("<I", 2 if damage == "count" else 1) + struct.pack("<32sI", rnd.randbytes(32), 40)
    body += b"".join(e.encode() for e in entries) + (b"x" if damage == "trailing" else b"")
    data = MAGIC + zstandard.ZstdCompressor().compress(body)
    name = hashlib.sha256(data).hexdigest()
    for limit in (0, 1 << 30):
        monkeypatch.setattr(index_mod, "FIND_MAX", limit)
        for wanted in ({entries[0].id}, {e.id for e in entries}):
            with pytest.raises(IntegrityError, match=words):
                find_entries(name, data, None, wanted)


# -- a repository of hundreds of blobs per layer --------------------------------------------------------------

@dataclass
class World:
    path: Path
    points: list[str]  #: full, inc1, inc2 of VM, each naming its run's index object
    truth: dict[str, Path]  #: point id → raw image of vda as of it
    hints: set[str]  #: the index objects the points name
    other: str  #: the index object of another VM's run: no restore of VM reads it


def _run(repo: Repository, blobs: list[bytes]) -> tuple[list[bytes], str]:
    w = repo.writer()
    ids = [b""] * len(blobs)
    for i, data in enumerate(blobs):
        w.add(data, lambda ident, stored, i=i: ids.__setitem__(i, ident))
    w.flush()
    assert w.index_name is not None
    return ids, w.index_name


def _commit(repo: Repository, vm: str, n: int, parent: str | None, writes: list[tuple[int, bytes | None]]) -> str:
    """Point *n* of *vm*: its writes (offset, data inside one chunk, or None: a ZERO chunk) stored in one
    run, then the manifest naming that run's index object (``extra.index``), as a backup commits."""
    writes = sorted(writes, key=lambda w: w[0])
    ids, index_name = _run(repo, [d for _, d in writes if d is not None])
    it = iter(ids)
    extents = [(off, len(d), next(it)) if d is not None else (off, CH, None) for off, d in writes]
    kind = "full" if parent is None else "incremental"
    t = T0 + n * 3600
    m = Manifest(id=new_point_id(t), vm=vm, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
                 parent=parent, kind=kind, disks={"vda": DiskRecord(kind=kind, virtual_size=SIZE, extents=extents,
                                                                    parent=parent)},
                 extra={"index": [index_name]})
    repo.commit(m)
    return m.id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """``vda`` of VM: a full of 343 chunks, an incremental of 300 small writes, one of 40 whole chunks and
    partial ones and 3 ZERO chunks — each layer more blobs than a search used to be allowed. Another VM's
    point holds 30 blobs in an index object of its own."""
    base = tmp_path_factory.mktemp("locate")
    repo = Repository.open(str(base / "repo"), create=True, config=RepoConfig(chunk_size=CH, pack_target=MiB))
    rnd = random.Random(21)
    full: list[tuple[int, bytes | None]] = [(c * CH, rnd.randbytes(CH)) for c in range(SIZE // CH) if c % 7]
    inc1: list[tuple[int, bytes | None]] = [(c * CH + (c * 97) % (CH - 4096), rnd.randbytes(4096))
                                            for c in rnd.sample(range(SIZE // CH), 300)]
    chunks = rnd.sample(range(SIZE // CH), 50)
    inc2: list[tuple[int, bytes | None]] = [(c * CH, rnd.randbytes(CH)) for c in chunks[:40]]
    inc2 += [(c * CH + 512, rnd.randbytes(CH - 1024)) for c in chunks[40:47]] + [(c * CH, None) for c in chunks[47:]]
    points, truth = [], {}
    disk = bytearray(SIZE)
    for n, writes in enumerate((full, inc1, inc2)):
        points.append(_commit(repo, VM, n, points[-1] if points else None, writes))
        for off, data in writes:
            disk[off:off + (CH if data is None else len(data))] = bytes(CH) if data is None else data
        truth[points[-1]] = base / f"{points[-1]}.raw"
        truth[points[-1]].write_bytes(disk)
    before = {i.name for i in repo.backend.list("index/")}
    _commit(repo, "othervm", 9, None, [(c * CH, rnd.randbytes(CH)) for c in range(30)])
    (other,) = {i.name for i in repo.backend.list("index/")} - before
    hints = {h for p in points for h in repo.manifest(VM, p).index_hints}
    assert len(hints) == 3 and other not in hints
    return World(base / "repo", points, truth, hints, other)


class Reads(BackendWrapper):
    """Records the index objects read and the prefixes listed."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.index: list[str] = []
        self.listed: list[str] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("index/"):
            self.index.append(name)
        return self.inner.get(name, offset, length)

    def list(self, prefix: str = ""):
        self.listed.append(prefix)
        return self.inner.list(prefix)


def _refuse_load(refresh: bool = False) -> None:
    raise AssertionError("the whole index was loaded")


def handle(path: Path) -> tuple[Repository, Reads]:
    """A fresh handle whose backend records its reads and which must never load the whole index."""
    base = Repository.open(str(path))
    reads = Reads(base.backend)
    repo = Repository(reads, base.config, base.url, base.keys, base.slot)
    repo.load_index = _refuse_load  # type: ignore[method-assign]
    return repo, reads


MODES = {"flat-raw": (True, "raw"), "flat-qcow2": (True, "qcow2"), "chain": (False, "qcow2")}


def _restore(path: Path, out: Path, point: str, mode: str, verify_only: bool = False) -> tuple[Repository, Reads]:
    repo, reads = handle(path)
    flat, fmt = MODES[mode]
    run_restore(repo, RestoreRequest(vm=VM, out=out, point=point, flat=flat, format=fmt, workers=2,
                                     verify_only=verify_only))
    assert repo._index is None
    return repo, reads


def _check(out: Path, mode: str, truth: Path) -> None:
    if MODES[mode][1] == "raw":
        assert (out / "vda.raw").read_bytes() == truth.read_bytes()
    else:
        identical(out / "vda.qcow2", truth)  # a flat qcow2, or the chain's top overlay


@pytest.mark.parametrize("mode", MODES)
def test_a_restore_of_hundreds_of_blobs_reads_only_its_points_hints_and_never_loads_the_index(
        world: World, tmp_path: Path, mode: str) -> None:
    for i, point in enumerate(world.points):
        out = tmp_path / f"p{i}"
        _, reads = _restore(world.path, out, point, mode)
        _check(out, mode, world.truth[point])
        assert "index/" not in reads.listed  # every blob was in a hint
        assert set(reads.index) <= world.hints and world.other not in reads.index
        assert Counter(reads.index).most_common(1)[0][1] == 1  # each hint read once (chain: once for all layers)


def test_verify_only_reads_only_the_hints_too(world: World, tmp_path: Path) -> None:
    for mode in ("flat-raw", "chain"):
        _, reads = _restore(world.path, tmp_path / "never", world.points[-1], mode, verify_only=True)
        assert "index/" not in reads.listed and set(reads.index) == world.hints
        assert len(reads.index) == 3
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("mode", MODES)
def test_a_restore_after_a_prune_consolidated_the_index_still_restores(world: World, tmp_path: Path,
                                                                       mode: str) -> None:
    """Every hint is gone (a prune with nothing to delete still merges the index objects into one): the
    blobs are found by reading each listed index object once, the whole index never loaded."""
    path = tmp_path / "repo"
    shutil.copytree(world.path, path)
    before = {i.name for i in Repository.open(str(path)).backend.list("index/")}
    prune(Repository.open(str(path)))
    after = {i.name for i in Repository.open(str(path)).backend.list("index/")}
    assert not after & before and not after & world.hints  # consolidated: every hint is stale
    for i in (0, 2):
        point = world.points[i]
        repo, reads = _restore(path, tmp_path / f"p{i}", point, mode)
        _check(tmp_path / f"p{i}", mode, world.truth[point])
        stale = {h for p in world.points[:i + 1] for h in repo.manifest(VM, p).index_hints}
        assert reads.listed.count("index/") == 1
        assert Counter(reads.index) == Counter(sorted(after | stale))  # each tried once (chain: for all layers)


def test_many_blobs_without_hints_are_located_without_loading_the_index(world: World) -> None:
    repo, reads = handle(world.path)
    m = repo.manifest(VM, world.points[0])
    blobs = [b for _, _, b in m.disks["vda"].extents if b is not None]
    assert len(blobs) > 256
    every = Repository.open(str(world.path)).load_index()
    located = repo.locate_many(blobs)
    assert list(located) == blobs and all(located[b] == every.lookup(b) for b in blobs)
    assert reads.listed.count("index/") == 1 and len(set(reads.index)) == len(reads.index)  # listed ones, each once
    # one blob found nowhere: the error locate raises, still without loading the index, after every index
    # object was read once (and a second listing found nothing new)
    reads.index.clear()
    reads.listed.clear()
    missing = hashlib.sha256(b"nowhere").digest()
    with pytest.raises(IntegrityError, match=f"blob {missing.hex()} is not in the repository index"):
        repo.locate_many([*blobs[:50], missing], sorted(world.hints))
    assert reads.listed.count("index/") == 2 and sorted(reads.index) == sorted(world.hints | {world.other})
    assert repo._index is None


# -- condemned packs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 20], ids=["search", "walk"])
def test_a_blob_in_a_condemned_pack_and_a_live_one_is_located_in_the_live_one(tmp_path: Path, count: int) -> None:
    """A run that never committed wrote *count* blobs (and one more); a prune condemned its pack; a later
    run stored the *count* blobs again. Whichever index object a reader meets first — by hints in either
    order, by listings in either order — it locates them in the live pack, and the one blob only the
    condemned pack holds there (readable until the grace ends)."""
    path = tmp_path / "repo"
    repo = create(path)
    rnd = random.Random(5)
    contents = [rnd.randbytes(4096) for _ in range(count + 1)]
    ids, _ = store(repo, contents)
    condemned_index = {i.name for i in repo.backend.list("index/")}
    (old,) = {reopen(path).load_index().lookup(b).pack for b in ids}
    assert prune(reopen(path), grace=HOUR).condemned_packs == 1
    again, _ = store(reopen(path), contents[:count])
    assert again == ids[:count]
    live_index = {i.name for i in repo.backend.list("index/")} - condemned_index
    fresh = {reopen(path).load_index().lookup(b).pack for b in again}
    assert len(fresh) == 1 and old not in fresh
    (old_name,), (new_name,) = condemned_index, live_index
    for hints in ([old_name, new_name], [new_name, old_name], []):
        for reverse in (False, True):
            reader = reopen(path)
            reader.backend = Listing(reader.backend, reverse)
            located = reader.locate_many(ids, hints)
            assert reader._index is None
            assert {located[b].pack for b in ids[:count]} == fresh, (hints, reverse)
            assert located[ids[-1]].pack == old  # only there: still found
            assert dict(reader.iter_blobs(ids, hints)) == dict(zip(ids, contents))
