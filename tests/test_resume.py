"""Resumable restore (issue #13): ``fleece restore --resume`` continues an interrupted restore.

At the API (no VM, repositories built by hand like tests/test_gc.py does): a restore is interrupted
*deterministically* — a backend wrapper lets N ranged pack reads through and then fails every further
one with :class:`TransientBackendError` (the storage gone after its retries), once the journal shows a
durable checkpoint. The truth of every point is kept in memory, so each resumed restore is compared byte
for byte, and every pack read of the resumed run is recorded, so "the ranges the journal lists are not
read again" is checked exactly: the resumed run reads the full plan minus those ranges, nothing else.

End to end: ``fleece restore --flat`` of a real VM's backup is killed with SIGTERM while its partial
image is being written; ``--resume`` then finishes it bit-exact and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import FLEECE, fleece, identical, ok
from fleece.repository import DiskRecord, Manifest, Piece, RepoConfig, Repository, new_point_id
from fleece.repository.backends import Backend, BackendWrapper
from fleece.repository.errors import IntegrityError, Interrupted, PermanentBackendError, TransientBackendError
from fleece.repository.pack import pack_name
from fleece.restore import fill as fill_mod
from fleece.restore import journal as journal_mod
from fleece.restore.fill import range_key
from fleece.restore.restore import RESUMABLE, RestoreRequest, RestoreResult, run_restore
from vm import random_bytes

MiB = 1 << 20
CH = MiB  #: chunk size: the 24 MiB disk is 22 blobs in the full, packs of 2 blobs (one range read each)
VDA = 24 * MiB  #: dense: its full and flat images are written directly (PreallocatedQcow2 / RawTarget)
VDB = 1 << 30  #: sparse (6 MiB of data): its qcow2 images go through qemu-nbd
VM = "resvm"
T0 = time.time() - 30 * 86400


# -- the repository and its truth ---------------------------------------------------------------------------

@dataclass
class World:
    path: Path  #: the repository directory (plain format, chunk 1 MiB, packs of ~2 MiB)
    base: Path  #: a directory of the module's own
    points: list[str]  #: full, inc1, inc2
    truth: dict[tuple[str, str], Path]  #: (point id, disk) → raw image of the disk as of that point

    @property
    def full(self) -> str:
        return self.points[0]

    @property
    def inc1(self) -> str:
        return self.points[1]

    @property
    def inc2(self) -> str:
        return self.points[2]


def _store(repo: Repository, blobs: list[bytes]) -> list[bytes]:
    """One writer run over *blobs*; their ids (packs close at the repository's pack_target)."""
    w = repo.writer()
    ids = [b""] * len(blobs)
    for i, data in enumerate(blobs):
        w.add(data, lambda ident, stored, i=i: ids.__setitem__(i, ident))
    w.flush()
    return ids


def _commit(repo: Repository, n: int, parent: str | None, disks: dict[str, tuple[int, list[tuple[int, bytes | None]]]]
            ) -> str:
    """Commit point number *n*: per disk its size and writes (offset, data inside one chunk, or None: a
    ZERO extent of one chunk). The blobs are stored first, the manifest last (like a backup)."""
    t = T0 + n * 3600
    records = {}
    for disk, (size, writes) in disks.items():
        writes = sorted(writes, key=lambda w: w[0])
        ids = iter(_store(repo, [data for _, data in writes if data is not None]))
        extents = [(off, len(data), next(ids)) if data is not None else (off, CH, None) for off, data in writes]
        kind = "full" if parent is None else "incremental"
        records[disk] = DiskRecord(kind=kind, virtual_size=size, extents=extents, parent=parent)
    m = Manifest(id=new_point_id(t), vm=VM, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
                 parent=parent, kind="full" if parent is None else "incremental", disks=records)
    repo.commit(m)
    return m.id


def _apply(image: bytearray, writes: list[tuple[int, bytes | None]]) -> None:
    for off, data in writes:
        image[off:off + (CH if data is None else len(data))] = bytes(CH) if data is None else data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """``vda`` (24 MiB): a full of 22 random chunks (chunks 5 and 17 never written), an incremental that
    overwrites whole chunks and parts of chunks (one of them in a hole), and one that overwrites again and
    zeroes a chunk (a ZERO extent: the overlay must mask it). ``vdb`` (1 GiB, 6 MiB of data) is only in the
    full: every point restores it from there (a ``--disk`` backup's view)."""
    base = tmp_path_factory.mktemp("resume")
    repo = Repository.open(str(base / "repo"), create=True, config=RepoConfig(chunk_size=CH, pack_target=2 * MiB))
    rnd = random.Random(13)
    full_vda: list[tuple[int, bytes | None]] = [(i * CH, rnd.randbytes(CH)) for i in range(VDA // CH)
                                                if i not in (5, 17)]
    full_vdb: list[tuple[int, bytes | None]] = [(off, rnd.randbytes(CH)) for off in
                                                (0, 100 * MiB, 300 * MiB, 512 * MiB, 700 * MiB, VDB - MiB)]
    inc1 = [(2 * CH, rnd.randbytes(CH)), (3 * CH, rnd.randbytes(CH)), (20 * CH, rnd.randbytes(CH)),
            (10 * CH + 4096, rnd.randbytes(300 << 10)), (5 * CH + 65536, rnd.randbytes(128 << 10))]
    inc2 = [(0, rnd.randbytes(CH)), (3 * CH, rnd.randbytes(CH)), (15 * CH + 8192, rnd.randbytes(64 << 10)),
            (7 * CH, None)]
    full = _commit(repo, 1, None, {"vda": (VDA, full_vda), "vdb": (VDB, full_vdb)})
    p1 = _commit(repo, 2, full, {"vda": (VDA, inc1)})
    p2 = _commit(repo, 3, p1, {"vda": (VDA, inc2)})
    truth: dict[tuple[str, str], Path] = {}
    vda, vdb = bytearray(VDA), base / "vdb.raw"
    with open(vdb, "wb") as f:
        f.truncate(VDB)
        for off, data in full_vdb:
            assert data is not None
            f.seek(off)
            f.write(data)
    for pid, writes in ((full, full_vda), (p1, inc1), (p2, inc2)):
        _apply(vda, writes)
        truth[(pid, "vda")] = base / f"{pid}.vda.raw"
        truth[(pid, "vda")].write_bytes(vda)
        truth[(pid, "vdb")] = vdb
    return World(base / "repo", base, [full, p1, p2], truth)


@pytest.fixture(autouse=True)
def small_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint (flush + journal line) every MiB: every range read of these disks makes one."""
    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", MiB)


# -- backend wrappers ---------------------------------------------------------------------------------------

def _is_pack_read(name: str, length: int | None) -> bool:
    return name.startswith("data/") and length is not None


class FailAfter(BackendWrapper):
    """Lets *reads* ranged pack reads through, then fails every further one with TransientBackendError —
    what the restore sees when the storage stays away past its retries. Before the first failure it waits
    (bounded) for *ready*: the journal holding the checkpoint the test needs, so the interruption lands
    at the same place every run whatever the threads' timing."""

    def __init__(self, inner: Backend, reads: int, ready: Callable[[], bool] | None = None,
                 error: Callable[[str], BaseException] | None = None) -> None:
        super().__init__(inner)
        self.left = reads
        self.error = error or (lambda name: TransientBackendError(f"cannot read {name}: connection reset by peer "
                                                                  "(test)", object=name))
        self.ready = ready
        self.failed = 0
        self._lock = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if _is_pack_read(name, length):
            with self._lock:
                self.left -= 1
                fail = self.left < 0
                first = fail and self.failed == 0
                self.failed += fail
            if fail:
                if first and self.ready is not None:
                    _wait(self.ready, 20)
                raise self.error(name)
        return self.inner.get(name, offset, length)


class PackReads(BackendWrapper):
    """Records every ranged read of a pack, named like the resume journal names it (``pack:start:end``)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.keys: list[str] = []
        self._lock = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if _is_pack_read(name, length):
            assert length is not None
            with self._lock:
                self.keys.append(f"{name.rsplit('/', 1)[1]}:{offset}:{offset + length}")
        return self.inner.get(name, offset, length)

    @property
    def bytes(self) -> int:
        return sum(_key_bytes(k) for k in self.keys)


def _key_bytes(key: str) -> int:
    _, start, end = key.rsplit(":", 2)
    return int(end) - int(start)


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- restoring ------------------------------------------------------------------------------------------------

def handle(world: World, wrap: Callable[[Backend], Backend] | None = None) -> Repository:
    """A fresh handle on the repository, its backend wrapped by *wrap* (like test_prune_torture's view)."""
    base = Repository.open(str(world.path))
    if wrap is None:
        return base
    return Repository(wrap(base.backend), base.config, base.url, base.keys, base.slot)


@dataclass
class Mode:
    flat: bool
    format: str = "qcow2"

    @property
    def partial(self) -> str:
        """The hidden name the disk ``vda`` is built under."""
        return f".vda.{self.format}.partial" if self.flat else ".vda.partial"

    def final(self, disk: str = "vda") -> list[str]:
        return [f"{disk}.{self.format}"] if self.flat else [disk, f"{disk}.qcow2"]


FLAT = Mode(True)
RAW = Mode(True, "raw")
CHAIN = Mode(False)


def restore(world: World, out: Path, mode: Mode, point: str, *, resume: bool = False,
            wrap: Callable[[Backend], Backend] | None = None, disks: list[str] | None = None,
            workers: int = 1) -> RestoreResult:
    return run_restore(handle(world, wrap), RestoreRequest(vm=VM, out=out, point=point, disks=disks or ["vda"],
                                                           flat=mode.flat, format=mode.format, workers=workers,
                                                           resume=resume))


def recorded(world: World, out: Path, mode: Mode, point: str, **kw: object) -> tuple[RestoreResult, PackReads]:
    """A restore whose pack reads are recorded."""
    reads: list[PackReads] = []

    def wrap(b: Backend) -> Backend:
        reads.append(PackReads(b))
        return reads[-1]

    result = restore(world, out, mode, point, wrap=wrap, **kw)  # type: ignore[arg-type]
    return result, reads[0]


def plan(world: World, mode: Mode, point: str, disk: str = "vda") -> dict[str, list[str]]:
    """Layer name (a point id) → the range reads restore makes for it, in order — computed the way
    :func:`fleece.restore.fill.fill` plans them (one layer for a flat image, the chain's full first)."""
    repo = Repository.open(str(world.path))
    m = repo.point_view(repo.manifest(VM, point))[disk]
    if mode.flat:
        layers = [(m.id, repo.resolve(m, disk))]
    else:
        layers = [(p.id, [Piece(off, n, blob, p.disks[disk].skips.get(off, 0))
                          for off, n, blob in p.disks[disk].extents]) for p in reversed(repo.disk_chain(m, disk))]
    out = {}
    for layer, pieces in layers:
        uses: dict[bytes, list[Piece]] = {}
        for p in pieces:
            if p.blob is not None:
                uses.setdefault(p.blob, []).append(p)
        out[layer] = [range_key(r) for r in repo.plan_reads(uses, fill_mod.MAX_RANGE, fill_mod.MAX_GAP)]
    return out


def data_bytes(world: World, point: str, disk: str = "vda") -> int:
    repo = Repository.open(str(world.path))
    m = repo.point_view(repo.manifest(VM, point))[disk]
    return sum(p.length for p in repo.resolve(m, disk) if p.blob is not None)


@dataclass
class JournalState:
    header: dict
    done: dict[str, set[str]]
    complete: set[str]
    lines: int  #: entries read (the header not counted)
    torn: int  #: lines that are not JSON


def read_journal(path: Path, *, strict: bool = True) -> JournalState:
    """The journal parsed on its own terms: JSON lines, the first a header; ``reset`` drops a layer's lines.
    *strict*: every line must be whole (what a restore that was not killed mid-append leaves)."""
    raw = path.read_bytes().split(b"\n")
    header = json.loads(raw[0])
    done: dict[str, set[str]] = {}
    complete: set[str] = set()
    n = torn = 0
    for line in raw[1:]:
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            assert not strict, f"{path}: a torn line {line!r}"
            torn += 1
            continue
        n += 1
        layer = entry["layer"]
        if entry.get("reset"):
            done.pop(layer, None)
            complete.discard(layer)
            continue
        if entry.get("complete"):
            complete.add(layer)
        done.setdefault(layer, set()).update(entry.get("done", []))
    return JournalState(header, done, complete, n, torn)


def journal_ready(path: Path, layer: str, least: int = 1) -> Callable[[], bool]:
    """The journal at *path* lists at least *least* done ranges of *layer* (whole lines only)."""
    def ready() -> bool:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return False
        keys: set[str] = set()
        for line in text.split(b"\n")[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("layer") == layer:
                keys |= set(entry.get("done", []))
        return len(keys) >= least

    return ready


def interrupt(world: World, out: Path, mode: Mode, point: str, reads: int, layer: str, *, disk: str = "vda",
              disks: list[str] | None = None, resume: bool = False, least: int = 1,
              ready: Callable[[], bool] | None = None, strict: bool = True) -> JournalState:
    """A restore that loses its storage after *reads* pack reads, once *disk*'s journal lists *least*
    durable ranges of *layer* (or once *ready*); it must keep only hidden files. Returns the journal it left."""
    journal = out / f".{disk}.resume"
    ready = ready or journal_ready(journal, layer, least)
    with pytest.raises(TransientBackendError):
        restore(world, out, mode, point, wrap=lambda b: FailAfter(b, reads, ready), disks=disks, resume=resume)
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".") for name in left), left
    assert f".{disk}.resume" in left, left
    state = read_journal(journal, strict=strict)
    assert len(state.done.get(layer, ())) >= least, (layer, state)
    assert layer not in state.complete, f"interrupted after {layer} was complete: fewer reads"
    return state


def assert_exact(world: World, out: Path, mode: Mode, point: str, disks: tuple[str, ...] = ("vda",)) -> None:
    """The restored disks equal the truth byte for byte, and nothing else is left in *out*."""
    assert sorted(p.name for p in out.iterdir()) == sorted(n for d in disks for n in mode.final(d))
    for d in disks:
        ref = world.truth[(point, d)]
        if mode.format == "raw":
            assert (out / f"{d}.raw").read_bytes() == ref.read_bytes(), f"{d}: the raw image differs from the truth"
        else:
            identical(out / f"{d}.qcow2", ref, "qcow2")


def expected_reads(full: dict[str, list[str]], state: JournalState, *, fresh: set[str] = frozenset()) -> list[str]:
    """What a resumed run reads: each layer's plan, minus everything of a complete layer and minus the
    ranges the journal lists of the others; layers in *fresh* (their image gone) are read whole."""
    out = []
    for layer, keys in full.items():
        if layer in fresh:
            out += keys
        elif layer not in state.complete:
            out += [k for k in keys if k not in state.done.get(layer, set())]
    return out


# -- interrupted, then resumed --------------------------------------------------------------------------------

#: (mode, index of the layer to interrupt in: 0 the full / the flat image, 1 the first overlay)
CASES = {"flat-qcow2": (FLAT, 0), "flat-raw": (RAW, 0), "chain-base": (CHAIN, 0), "chain-overlay": (CHAIN, 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_restore_resumes_exactly_without_reading_the_journaled_ranges(world: World, tmp_path: Path,
                                                                                  case: str) -> None:
    mode, at = CASES[case]
    point = world.inc2
    full = plan(world, mode, point)
    layers = list(full)
    layer = layers[at]
    assert len(full[layer]) >= 2, full
    reads = sum(len(full[lay]) for lay in layers[:at]) + len(full[layer]) // 2
    out = tmp_path / "out"
    state = interrupt(world, out, mode, point, reads, layer)

    # only hidden names, private; the journal names this restore and lists durable ranges of this plan
    assert sorted(p.name for p in out.iterdir()) == sorted([mode.partial, ".vda.resume"])
    for p in out.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o600, p
    assert state.header["point"] == point and state.header["disk"] == "vda" and state.header["vm"] == VM, state.header
    assert state.header["mode"] == ("flat" if mode.flat else "chain") and state.header["format"] == mode.format
    assert state.header["repository"] == Repository.open(str(world.path)).config.id
    assert state.done[layer] <= set(full[layer]), (state.done, full)
    assert set(layers[:at]) <= state.complete and layer not in state.complete, state
    if not mode.flat:
        assert sorted(p.name for p in (out / mode.partial).iterdir()) == [f"{lay}.qcow2" for lay in layers[:at + 1]]

    result, got = recorded(world, out, mode, point, resume=True)
    assert_exact(world, out, mode, point)
    assert sorted(got.keys) == sorted(expected_reads(full, state)), "the resumed run read what the journal lists"
    everything = sum(_key_bytes(k) for keys in full.values() for k in keys)
    assert got.bytes < everything
    (disk,) = result.disks
    assert disk.stats["fetched_bytes"] == got.bytes
    if mode.flat:  # chain: test_chain_resume_reports_its_resumed_bytes
        # random data has no zero grains: every data byte was either skipped or written now
        assert disk.stats["resumed_bytes"] > 0, disk.stats
        assert disk.stats["resumed_bytes"] + disk.stats["data_bytes"] == data_bytes(world, point), disk.stats


def test_full_restore_reads_exactly_its_plan(world: World, tmp_path: Path) -> None:
    """The yardstick of the resume tests: an uninterrupted restore reads each planned range once."""
    for mode in (FLAT, CHAIN):
        out = tmp_path / f"out-{mode.flat}"
        result, got = recorded(world, out, mode, world.inc2)
        assert sorted(got.keys) == sorted(k for keys in plan(world, mode, world.inc2).values() for k in keys)
        assert result.disks[0].stats["resumed_bytes"] == 0
        assert_exact(world, out, mode, world.inc2)


def test_chain_resume_reports_its_resumed_bytes(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    full = plan(world, CHAIN, world.inc2)
    base = world.full
    interrupt(world, out, CHAIN, world.inc2, len(full[base]) // 2, base)
    result = restore(world, out, CHAIN, world.inc2, resume=True)
    assert_exact(world, out, CHAIN, world.inc2)
    assert result.disks[0].stats["resumed_bytes"] > 0, result.disks[0].stats


def test_a_resumed_restore_interrupted_again_resumes_again(world: World, tmp_path: Path) -> None:
    """Resume, lose the storage again further on, resume once more: the journal keeps growing, the last
    run reads only what neither earlier run made durable."""
    out = tmp_path / "out"
    full = plan(world, CHAIN, world.inc2)
    base, inc1, _ = full
    interrupt(world, out, CHAIN, world.inc2, 2, base)
    left = sum(1 for k in full[base] if k not in read_journal(out / ".vda.resume").done[base])
    state = interrupt(world, out, CHAIN, world.inc2, left + 1, inc1, resume=True)
    assert base in state.complete
    _, got = recorded(world, out, CHAIN, world.inc2, resume=True)
    assert_exact(world, out, CHAIN, world.inc2)
    assert sorted(got.keys) == sorted(expected_reads(full, state))


def test_resume_of_a_multi_disk_restore_skips_the_disks_it_completed(world: World, tmp_path: Path) -> None:
    """Interrupted in its second disk (sparse: served by qemu-nbd), a restore has built its first disk but
    put neither in place (all or nothing); resuming reads nothing of the first and only the rest of the second."""
    out = tmp_path / "out"
    vda, vdb = plan(world, FLAT, world.inc2), plan(world, FLAT, world.inc2, "vdb")
    (vdb_layer,) = vdb
    state = interrupt(world, out, FLAT, world.inc2, len(vda[world.inc2]) + 1, vdb_layer, disk="vdb",
                      disks=["vda", "vdb"])
    assert sorted(p.name for p in out.iterdir()) == [".vda.qcow2.partial", ".vda.resume", ".vdb.qcow2.partial",
                                                     ".vdb.resume"]
    assert read_journal(out / ".vda.resume").complete == {world.inc2}
    result, got = recorded(world, out, FLAT, world.inc2, resume=True, disks=["vda", "vdb"])
    assert_exact(world, out, FLAT, world.inc2, ("vda", "vdb"))
    assert sorted(got.keys) == sorted(expected_reads(vdb, state))
    stats = {d.disk: d.stats for d in result.disks}
    assert stats["vda"]["resumed_bytes"] == data_bytes(world, world.inc2) and stats["vda"]["fetched_bytes"] == 0
    assert stats["vdb"]["resumed_bytes"] > 0, stats


#: what stops a restore, and whether it keeps its partial images and journal for --resume
STOPS: dict[str, tuple[Callable[[str], BaseException], bool]] = {
    "transient": (lambda name: TransientBackendError(f"{name}: timed out (test)", object=name), True),
    "interrupted": (lambda name: Interrupted("interrupted (test)"), True),
    "ctrl-c": (lambda name: KeyboardInterrupt(), True),
    "permanent": (lambda name: PermanentBackendError(f"{name}: access denied (test)", object=name), False),
    "internal": (lambda name: RuntimeError("a bug (test)"), False),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_only_an_interruption_keeps_what_the_restore_wrote(world: World, tmp_path: Path, stop: str) -> None:
    """Ctrl-C, SIGTERM (Interrupted) and the storage gone keep the partials for --resume; a refusal or
    a bug removes them and the --out the restore made (a second try would meet it again)."""
    error, kept = STOPS[stop]
    out = tmp_path / "out"
    (layer,) = plan(world, FLAT, world.inc2)
    ready = journal_ready(out / ".vda.resume", layer)
    with pytest.raises(type(error("x"))):
        restore(world, out, FLAT, world.inc2, wrap=lambda b: FailAfter(b, 3, ready, error))
    if not kept:
        assert not out.exists(), list(out.rglob("*"))
        return
    assert sorted(p.name for p in out.iterdir()) == [FLAT.partial, ".vda.resume"]
    result = restore(world, out, FLAT, world.inc2, resume=True)
    assert result.disks[0].stats["resumed_bytes"] > 0
    assert_exact(world, out, FLAT, world.inc2)


# -- what is not continued --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [FLAT, RAW, CHAIN], ids=["flat-qcow2", "flat-raw", "chain"])
def test_without_resume_the_restore_starts_over(world: World, tmp_path: Path, mode: Mode) -> None:
    out = tmp_path / "out"
    full = plan(world, mode, world.inc2)
    first = next(iter(full))
    interrupt(world, out, mode, world.inc2, 3, first)
    result, got = recorded(world, out, mode, world.inc2)
    assert result.disks[0].stats["resumed_bytes"] == 0
    assert sorted(got.keys) == sorted(k for keys in full.values() for k in keys)
    assert_exact(world, out, mode, world.inc2)  # and the leftovers are gone


def test_resume_with_nothing_to_resume_is_a_plain_restore(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = restore(world, out, FLAT, world.inc1, resume=True)
    assert result.disks[0].stats["resumed_bytes"] == 0
    assert_exact(world, out, FLAT, world.inc1)


@pytest.mark.parametrize("mode", [FLAT, CHAIN], ids=["flat", "chain"])
def test_a_journal_of_another_point_is_not_continued(world: World, tmp_path: Path, mode: Mode) -> None:
    """Interrupted restoring inc2, resumed restoring inc1 into the same --out: starts over (in a chain the
    full layer has the same name in both, yet it is made anew: the journal belongs to another restore)."""
    out = tmp_path / "out"
    interrupt(world, out, mode, world.inc2, 3, next(iter(plan(world, mode, world.inc2))))
    result, got = recorded(world, out, mode, world.inc1, resume=True)
    assert result.disks[0].stats["resumed_bytes"] == 0
    assert sorted(got.keys) == sorted(k for keys in plan(world, mode, world.inc1).values() for k in keys)
    assert_exact(world, out, mode, world.inc1)


def test_a_journal_of_another_mode_is_not_continued(world: World, tmp_path: Path) -> None:
    """A chain restore interrupted, then ``--flat --resume``: the chain's partial directory goes too."""
    out = tmp_path / "out"
    interrupt(world, out, CHAIN, world.inc2, 3, world.full)
    result = restore(world, out, FLAT, world.inc2, resume=True)
    assert result.disks[0].stats["resumed_bytes"] == 0
    assert_exact(world, out, FLAT, world.inc2)


def _damaged_copy(world: World, tmp_path: Path, mode: Mode, point: str) -> tuple[World, dict[str, list[str]]]:
    """A copy of the repository with one byte flipped inside the last range the restore reads."""
    copy = tmp_path / "repo"
    shutil.copytree(world.path, copy)
    damaged = World(copy, world.base, world.points, world.truth)
    full = plan(damaged, mode, point)
    last = list(full.values())[-1][-1]
    pack, start, end = last.rsplit(":", 2)
    f = copy / pack_name(pack)
    with open(f, "r+b") as fh:
        pos = (int(start) + int(end)) // 2
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x40]))
    return damaged, full


@pytest.mark.parametrize("mode", [FLAT, CHAIN], ids=["flat", "chain"])
def test_a_damaged_pack_removes_the_partials_and_the_journal(world: World, tmp_path: Path, mode: Mode) -> None:
    """Damage is not an interruption: a second try would meet it again, so nothing is kept — neither by a
    first run (its --out, which it made, goes too) nor by a resumed one (which kept what the interrupted
    run wrote until it met the damage)."""
    assert IntegrityError not in RESUMABLE
    damaged, full = _damaged_copy(world, tmp_path, mode, world.inc2)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        restore(damaged, out, mode, world.inc2)
    assert not out.exists() or not list(out.iterdir()), list(out.rglob("*"))

    first = next(iter(full))
    interrupt(damaged, out, mode, world.inc2, 3, first)
    with pytest.raises(IntegrityError):
        restore(damaged, out, mode, world.inc2, resume=True)
    assert not out.exists() or not list(out.iterdir()), list(out.rglob("*"))


# -- damaged or tampered leftovers ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [FLAT, CHAIN], ids=["flat", "chain"])
def test_a_torn_last_journal_line_is_ignored(world: World, tmp_path: Path, mode: Mode) -> None:
    """Killed mid-append, the journal ends in half a line: the lines before it still count, the torn one not."""
    out = tmp_path / "out"
    full = plan(world, mode, world.inc2)
    first = next(iter(full))
    interrupt(world, out, mode, world.inc2, 4, first, least=2)
    journal = out / ".vda.resume"
    lines = journal.read_bytes().split(b"\n")
    # the last done line, torn: drop it and put back its first half (no newline)
    last = max(i for i, ln in enumerate(lines) if ln.startswith(b"{") and b'"done"' in ln)
    torn = lines[last]
    kept = b"\n".join(lines[:last]) + b"\n"
    journal.write_bytes(kept + torn[:len(torn) // 2])
    (tmp_path / "kept").write_bytes(kept)
    state = read_journal(tmp_path / "kept")
    assert state.done[first], "some ranges stay journaled before the torn line"
    result, got = recorded(world, out, mode, world.inc2, resume=True)
    assert_exact(world, out, mode, world.inc2)
    assert sorted(got.keys) == sorted(expected_reads(full, state))
    if mode.flat:
        assert result.disks[0].stats["resumed_bytes"] > 0


@pytest.mark.parametrize("case", ["flat", "chain-base", "chain-overlay"])
def test_a_journal_whose_image_was_deleted_makes_that_layer_anew(world: World, tmp_path: Path, case: str) -> None:
    """The user deleted a partial image but not its journal: that layer is made anew (its journal lines
    count for nothing), the other layers continue."""
    mode = FLAT if case == "flat" else CHAIN
    out = tmp_path / "out"
    full = plan(world, mode, world.inc2)
    layers = list(full)
    at = 1 if mode is CHAIN else 0
    reads = sum(len(full[lay]) for lay in layers[:at]) + 1
    state = interrupt(world, out, mode, world.inc2, reads, layers[at])
    gone = layers[0] if case == "chain-base" else layers[at]
    if mode.flat:
        (out / mode.partial).unlink()
    else:
        (out / mode.partial / f"{gone}.qcow2").unlink()
    result, got = recorded(world, out, mode, world.inc2, resume=True)
    assert_exact(world, out, mode, world.inc2)
    assert sorted(got.keys) == sorted(expected_reads(full, state, fresh={gone}))
    if mode.flat:
        assert result.disks[0].stats["resumed_bytes"] == 0


@pytest.mark.parametrize("case", ["flat-qcow2", "flat-raw", "chain-overlay"])
def test_a_partial_image_that_cannot_be_continued_is_made_anew(world: World, tmp_path: Path, case: str) -> None:
    """A partial image replaced by something else (a truncated raw file, a file that is no qcow2): the
    journal's ranges cannot be trusted to be in it, so that image is made anew."""
    mode = {"flat-qcow2": FLAT, "flat-raw": RAW, "chain-overlay": CHAIN}[case]
    out = tmp_path / "out"
    full = plan(world, mode, world.inc2)
    layers = list(full)
    at = 1 if mode is CHAIN else 0
    state = interrupt(world, out, mode, world.inc2, sum(len(full[lay]) for lay in layers[:at]) + 1, layers[at])
    image = out / mode.partial if mode.flat else out / mode.partial / f"{layers[at]}.qcow2"
    if mode.format == "raw":
        os.truncate(image, VDA - 4096)
    else:
        image.write_bytes(b"not a qcow2 image" * 1000)
    result, got = recorded(world, out, mode, world.inc2, resume=True)
    assert_exact(world, out, mode, world.inc2)
    assert sorted(got.keys) == sorted(expected_reads(full, state, fresh={layers[at]}))
    if mode.flat:
        assert result.disks[0].stats["resumed_bytes"] == 0


def test_a_journal_reset_after_a_torn_line_is_not_lost(world: World, tmp_path: Path) -> None:
    """Torn tail, then the image deleted, then the resumed run interrupted early, then resumed again. The
    second run made the image anew and wrote only its first range: what the first run journaled must
    not be skipped by the third (the ``reset`` line the second run appended must survive the torn tail)."""
    out = tmp_path / "out"
    full = plan(world, FLAT, world.inc2)
    (layer,) = full
    first = interrupt(world, out, FLAT, world.inc2, 8, layer, least=6)
    journal = out / ".vda.resume"
    with open(journal, "ab") as f:
        f.write(b'{"done": ["')  # a torn append
    (out / FLAT.partial).unlink()
    before = len(journal.read_bytes())

    def reset_then_checkpoint() -> bool:
        """The second run's reset line, then one checkpoint of the new image (counting newlines would
        not do: the line after a torn one begins with its own newline)."""
        if b'"reset": true' not in journal.read_bytes()[before:]:
            return False
        return len(read_journal(journal, strict=False).done.get(layer, ())) >= 1

    interrupt(world, out, FLAT, world.inc2, 1, layer, resume=True, strict=False, ready=reset_then_checkpoint)
    assert len(first.done[layer]) > 1
    restore(world, out, FLAT, world.inc2, resume=True)
    assert_exact(world, out, FLAT, world.inc2)


# -- end to end ---------------------------------------------------------------------------------------------

def _allocated(path: Path) -> int:
    """Bytes of *path* on disk (0 while it does not exist): its data grows as the restore writes it."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def test_sigterm_during_a_flat_restore_then_resume(make_vm, tmp_path: Path, scratch: Path) -> None:
    """``fleece restore --flat`` killed by SIGTERM while its image is being written: exit 1, told to use
    --resume, only hidden files left; ``--resume`` finishes it bit-exact with no leftovers. (Whether bytes
    were skipped depends on where the signal landed: the 256 MiB checkpoints of a real run are larger
    than this disk, so only the image, not its ranges, may be reused.)"""
    vm = make_vm({"vda": 48 * MiB})
    for i in range(3):
        vm.write("vda", i * 16 * MiB, random_bytes(16 * MiB, 40 + i))
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json")
    assert p.returncode == 0, p.stderr
    ref = vm.snapshot_refs("backup")["vda"]
    out = tmp_path / "out"
    argv = [FLEECE, "restore", "--repo", repo, "--vm", "testvm", "--out", str(out), "--flat", "--workers", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait(lambda: proc.poll() is not None or _allocated(out / ".vda.qcow2.partial") >= MiB, 60)
        os.kill(proc.pid, signal.SIGTERM)  # inside the fill: the image holds data already
        assert proc.poll() is None or proc.returncode != 0, "the restore finished before it was interrupted"
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "--resume" in stderr and "Traceback" not in stderr, stderr
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".") for name in left), left
    assert ".vda.resume" in left, left

    doc = ok(fleece(*argv[1:], "--resume", "--json"))
    assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2"], "no leftovers"
    identical(out / "vda.qcow2", ref, "qcow2")
    resumed = doc["resumed_bytes"]
    assert resumed == doc["disks"]["vda"]["resumed_bytes"] and resumed >= 0, f"resumed_bytes {resumed}: {doc}"
