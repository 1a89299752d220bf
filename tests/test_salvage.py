"""Damage never hides, and salvage keeps what is intact.

A real local repository holds real backups — VM ``alpha``: a full and an incremental on top of it; VM
``beta``: a full — written by the repository's own writer into small packs. Each test damages a copy of
it the ways storage fails (a flipped byte in a pack's table, footer or magic; a pack truncated or
extended by one byte, replaced by another pack, deleted, garbled in its data; an index that disagrees
with a pack) and checks that

* ``verify --read-data`` names every damaged pack and the points that need it (exit 1);
* ``rebuild-index`` after losing ``index/`` indexes every readable pack, names the damaged ones and the
  points that need blobs only they held, and the other points restore bit-exact;
* ``verify`` lists the points before it loads the index, so a point committed by a concurrent backup in
  between is not called damaged (restic's read-ordering rule; see ``repository/check.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import fleece, identical
from faults import Fault, Faulty
from fleece.repository import DiskRecord, IntegrityError, Manifest, RepoConfig, Repository, new_point_id
from fleece.repository.check import verify
from fleece.repository.index import decode_index, encode_index
from fleece.repository.pack import FOOTER_SIZE, PackEntry, pack_name
from fleece.restore import RestoreRequest, run_restore

CHUNK = 4 << 20
ALPHA_SIZE = 4 * CHUNK
BETA_SIZE = 2 * CHUNK


def text(seed: int, n: int = CHUNK) -> bytes:
    """Compressible, distinct per seed (so nothing dedups by accident)."""
    line = b"".join(f"{seed:08d} line {i} of a fairly compressible guest file\n".encode() for i in range(2000))
    return (line * (n // len(line) + 1))[:n]


def commit(repo: Repository, vm: str, size: int, pieces: list[tuple[int, int, bytes | None]],
           parent: Manifest | None = None) -> Manifest:
    """One point of one disk ``d0``: *pieces* are ``(offset, length, data | None for ZERO)``."""
    extents: list[tuple[int, int, bytes | None]] = []
    lock = threading.Lock()
    with repo.writer() as w:
        for off, n, data in pieces:
            if data is None:
                extents.append((off, n, None))
                continue

            def done(ident: bytes, stored: int, off: int = off, n: int = n) -> None:
                with lock:
                    extents.append((off, n, ident))
            w.add(data, done)
        stats = w.flush()
    kind = "full" if parent is None else "incremental"
    rec = DiskRecord(kind, size, sorted(extents), stats=stats.as_dict(), parent=parent.id if parent else None)
    m = Manifest(new_point_id(), vm, "2026-11-26T00:00:00Z", parent.id if parent else None, kind, {"d0": rec})
    repo.commit(m)
    return m


def apply(base: bytes, pieces: list[tuple[int, int, bytes | None]]) -> bytes:
    out = bytearray(base)
    for off, n, data in pieces:
        out[off:off + n] = data if data is not None else b"\0" * n
    return bytes(out)


@dataclass
class Backups:
    root: Path
    a1: Manifest
    a2: Manifest
    b1: Manifest
    truth: dict[str, bytes]  # point id -> the whole disk d0 as of that point


@pytest.fixture(scope="module")
def backups(tmp_path_factory: pytest.TempPathFactory) -> Backups:
    root = tmp_path_factory.mktemp("salvage") / "repo"
    repo = Repository.open(str(root), create=True, config=RepoConfig(pack_target=1 << 20))
    full = [(0, CHUNK, text(1)), (CHUNK, CHUNK, os.urandom(CHUNK)), (2 * CHUNK, CHUNK, os.urandom(CHUNK)),
            (3 * CHUNK, CHUNK, b"\0" * (CHUNK - 512) + os.urandom(512))]
    a1 = commit(repo, "alpha", ALPHA_SIZE, full)
    inc = [(CHUNK + 8192, 65536, os.urandom(65536)), (2 * CHUNK, 4096, None), (3 * CHUNK, 300_000, text(2, 300_000))]
    a2 = commit(repo, "alpha", ALPHA_SIZE, inc, parent=a1)
    beta = [(0, CHUNK, os.urandom(CHUNK)), (CHUNK, CHUNK, text(3))]
    b1 = commit(repo, "beta", BETA_SIZE, beta)
    t_a1 = apply(b"\0" * ALPHA_SIZE, full)
    truth = {a1.id: t_a1, a2.id: apply(t_a1, inc), b1.id: apply(b"\0" * BETA_SIZE, beta)}
    return Backups(root, a1, a2, b1, truth)


@pytest.fixture
def copy(backups: Backups, tmp_path: Path) -> Path:
    """A private copy of the backups to damage."""
    dst = tmp_path / "repo"
    shutil.copytree(backups.root, dst)
    return dst


# -- helpers --------------------------------------------------------------------------------------------

def own_packs(repo: Repository, m: Manifest) -> set[str]:
    index = repo.load_index()
    return {index.lookup(b).pack for rec in m.disks.values() for _, _, b in rec.extents if b is not None}


def exclusive_pack(repo: Repository, m: Manifest, others: list[Manifest]) -> str:
    """A pack only *m*'s own blobs use (the biggest: one holding a random, stored-raw chunk if any)."""
    mine = own_packs(repo, m) - set().union(*(own_packs(repo, o) for o in others))
    assert mine, f"point {m.id} has no pack of its own"
    return max(mine, key=lambda p: repo.backend.head(pack_name(p)).size)


def pack_path(root: Path, pack: str) -> Path:
    return root / pack_name(pack)


def flip(path: Path, at: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(bytes(raw))


def entries_of(root: Path, pack: str) -> list[PackEntry]:
    repo = Repository.open(str(root))
    return [e for p, es in _index_tables(repo) if p == pack for e in es]


def _index_tables(repo: Repository) -> list[tuple[str, list[PackEntry]]]:
    out = []
    for info in repo.backend.list("index/"):
        out.extend((pack, entries) for pack, entries, _ in decode_index(info.name.split("/", 1)[1],
                                                                         repo.backend.get(info.name)))
    return out


def damage(root: Path, pack: str, kind: str) -> None:
    """Damage one pack (or what the index says about it) the way *kind* names."""
    path = pack_path(root, pack)
    size = path.stat().st_size
    if kind == "table":
        flip(path, size - FOOTER_SIZE - 17)  # inside the last table entry
    elif kind == "footer-count":
        flip(path, size - FOOTER_SIZE)  # low byte of the blob count
    elif kind == "footer-digest":
        flip(path, size - FOOTER_SIZE + 4 + 9)  # inside sha256(table)
    elif kind == "magic":
        flip(path, size - 3, 0x20)
    elif kind == "truncate-1":
        with open(path, "r+b") as f:
            f.truncate(size - 1)
    elif kind == "append-1":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif kind == "swapped":  # the object holds another (intact) pack: its table is fine but not its name's
        other = next(p for p in root.glob("data/*/*") if p.name != pack)
        path.write_bytes(other.read_bytes())
    elif kind == "deleted":
        path.unlink()
    elif kind == "garbled-data":  # the middle of the biggest payload: only reading the blob can tell
        e = max(entries_of(root, pack), key=lambda e: e.length)
        flip(path, e.offset + e.length // 2, 0x40)
    elif kind == "index-lies":  # a well-formed index object whose entries for the pack are wrong
        repo = Repository.open(str(root))
        packs = []
        for p, es in _index_tables(repo):
            if p == pack:
                e = es[0]
                es = [PackEntry(e.id, e.offset, e.length, e.raw_length + 1, e.encoding), *es[1:]]
            packs.append((p, es))
        for info in list(repo.backend.list("index/")):
            repo.backend.delete(info.name)
        index_id, data = encode_index(packs)
        repo.backend.put(f"index/{index_id}", data)
    else:
        raise AssertionError(kind)


def lose_index(root: Path) -> None:
    shutil.rmtree(root / "index")


def restore_bytes(root: Path, m: Manifest, out: Path) -> bytes:
    run_restore(Repository.open(str(root)), RestoreRequest(vm=m.vm, out=out, point=m.id, flat=True, format="raw"))
    return (out / "d0.raw").read_bytes()


def by_id(report) -> dict[str, object]:  # noqa: ANN001 - VerifyReport
    return {p.id: p for p in report.points}


TRAILER_DAMAGE = ["table", "footer-count", "footer-digest", "magic", "truncate-1", "append-1", "swapped"]


# -- the healthy repository ----------------------------------------------------------------------------

def test_healthy_repository_is_clean_and_rebuilds_to_the_same(backups: Backups, copy: Path, tmp_path: Path) -> None:
    for read_data in (False, True):
        report = verify(Repository.open(str(copy)), read_data=read_data)
        assert report.ok, (report.repository_problems, [p.problems for p in report.points])
        assert report.damaged_packs == {} and len(report.points) == 3
    before = {(p, tuple(es)) for p, es in _index_tables(Repository.open(str(copy)))}
    lose_index(copy)
    report = Repository.open(str(copy)).rebuild_index()
    assert report.ok and report.damaged == {} and report.points == {} and report.missing == []
    assert {(p, tuple(es)) for p, es in _index_tables(Repository.open(str(copy)))} == before
    assert restore_bytes(copy, backups.a2, tmp_path / "a2") == backups.truth[backups.a2.id]


# -- (a) verify --read-data names every damaged pack -----------------------------------------------------

@pytest.mark.parametrize("kind", TRAILER_DAMAGE + ["index-lies", "deleted"])
def test_verify_read_data_names_a_damaged_pack_of_one_point(backups: Backups, copy: Path, kind: str) -> None:
    repo = Repository.open(str(copy))
    pack = exclusive_pack(repo, backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, kind)
    report = verify(Repository.open(str(copy)), read_data=True)
    assert not report.ok
    assert list(report.damaged_packs) == [pack_name(pack)], report.repository_problems
    assert report.damaged_packs[pack_name(pack)]["points"] == [f"beta/{backups.b1.id}"]
    line = next(p for p in report.repository_problems if pack_name(pack) in p)
    assert f"beta/{backups.b1.id}" in line
    points = by_id(report)
    assert not points[backups.b1.id].ok and any(pack_name(pack) in x for x in points[backups.b1.id].problems)
    assert points[backups.a1.id].ok and points[backups.a2.id].ok
    if kind == "index-lies":
        assert "disagree" in report.damaged_packs[pack_name(pack)]["problem"]
    if kind == "swapped":
        assert "does not match its name" in report.damaged_packs[pack_name(pack)]["problem"]


@pytest.mark.parametrize("kind", ["truncate-1", "append-1", "deleted"])
def test_plain_verify_sees_a_pack_of_the_wrong_size(backups: Backups, copy: Path, kind: str) -> None:
    """The listing and the index alone show a pack truncated or extended by one byte, or gone."""
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, kind)
    report = verify(Repository.open(str(copy)))
    assert not report.ok and list(report.damaged_packs) == [pack_name(pack)]
    assert ("missing" if kind == "deleted" else "bytes") in report.damaged_packs[pack_name(pack)]["problem"]
    assert [p.id for p in report.points if not p.ok] == [backups.b1.id]


def test_a_damaged_pack_of_a_full_damages_the_chain_on_it(backups: Backups, copy: Path) -> None:
    pack = exclusive_pack(Repository.open(str(copy)), backups.a1, [backups.a2, backups.b1])
    damage(copy, pack, "table")
    report = verify(Repository.open(str(copy)), read_data=True)
    name = pack_name(pack)
    assert report.damaged_packs[name]["points"] == [f"alpha/{backups.a1.id}", f"alpha/{backups.a2.id}"]
    points = by_id(report)
    assert any(name in x for x in points[backups.a1.id].problems)
    assert f"depends on damaged point {backups.a1.id}" in points[backups.a2.id].problems
    assert points[backups.b1.id].ok


def test_verify_of_one_vm_checks_only_its_packs(backups: Backups, copy: Path) -> None:
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "magic")
    assert verify(Repository.open(str(copy)), vm="alpha", read_data=True).ok
    report = verify(Repository.open(str(copy)), vm="beta", read_data=True)
    assert list(report.damaged_packs) == [pack_name(pack)] and not report.ok


def test_garbled_blob_data_is_caught_by_reading_it(backups: Backups, copy: Path) -> None:
    """The trailer does not cover payloads: a byte flipped in blob data is found by --read-data's blob reads."""
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "garbled-data")
    assert verify(Repository.open(str(copy))).ok  # structure intact: only reading the data can tell
    report = verify(Repository.open(str(copy)), read_data=True)
    points = by_id(report)
    assert not report.ok and report.damaged_packs == {}
    assert any(pack in x and "does not match its id" in x for x in points[backups.b1.id].problems)
    assert points[backups.a1.id].ok and points[backups.a2.id].ok


# -- (b) rebuild-index salvages --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TRAILER_DAMAGE + ["deleted"])
def test_rebuild_after_losing_the_index_salvages_the_intact_points(backups: Backups, copy: Path, tmp_path: Path,
                                                                   kind: str) -> None:
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, kind)
    lose_index(copy)
    repo = Repository.open(str(copy))
    report = repo.rebuild_index()
    assert not report.ok
    b1 = f"beta/{backups.b1.id}"
    assert list(report.points) == [b1]
    if kind == "deleted":  # nothing is left to name it: the point says what it lacks
        assert report.damaged == {} and "no pack holds" in report.points[b1][0]
    else:
        assert list(report.damaged) == [pack_name(pack)] and report.kept == {}
        assert pack_name(pack) in report.points[b1][0]
    assert [i.name for i in repo.backend.list("index/")] == [report.index]
    # every point that does not need the damaged pack restores bit-exact
    for m in (backups.a1, backups.a2):
        assert restore_bytes(copy, m, tmp_path / m.id) == backups.truth[m.id]
    with pytest.raises(IntegrityError, match="not in the repository index"):
        restore_bytes(copy, backups.b1, tmp_path / "b1")
    after = verify(Repository.open(str(copy)), read_data=True)
    assert [p.id for p in after.points if not p.ok] == [backups.b1.id]


def test_rebuild_salvage_of_a_chain_restores_the_other_vm_as_a_qcow2_chain(backups: Backups, copy: Path,
                                                                          tmp_path: Path) -> None:
    pack = exclusive_pack(Repository.open(str(copy)), backups.a1, [backups.a2, backups.b1])
    damage(copy, pack, "footer-digest")
    lose_index(copy)
    report = Repository.open(str(copy)).rebuild_index()
    assert list(report.damaged) == [pack_name(pack)]
    a1, a2 = f"alpha/{backups.a1.id}", f"alpha/{backups.a2.id}"
    assert sorted(report.points) == [a1, a2]
    assert any(f"depends on point {backups.a1.id}" in x for x in report.points[a2])
    run_restore(Repository.open(str(copy)), RestoreRequest(vm="beta", out=tmp_path / "b"))  # qcow2 chain mode
    ref = tmp_path / "b1.raw"
    ref.write_bytes(backups.truth[backups.b1.id])
    identical(tmp_path / "b" / "d0.qcow2", ref)


def test_rebuild_with_the_index_keeps_a_damaged_pack_s_entries(backups: Backups, copy: Path, tmp_path: Path) -> None:
    """The old index is the only record of a pack whose table is damaged: rebuild keeps it, verify still shouts."""
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "table")
    report = Repository.open(str(copy)).rebuild_index()
    b1 = f"beta/{backups.b1.id}"
    assert not report.ok and list(report.damaged) == [pack_name(pack)] and pack_name(pack) in report.kept
    assert list(report.points) == [b1] and "old index entries were kept" in report.points[b1][0]
    assert restore_bytes(copy, backups.b1, tmp_path / "b1") == backups.truth[backups.b1.id]  # data intact
    again = verify(Repository.open(str(copy)), read_data=True)
    assert not again.ok and list(again.damaged_packs) == [pack_name(pack)]  # the damage never hides
    assert Repository.open(str(copy)).rebuild_index().kept == report.kept  # stable when run again


def test_rebuild_with_the_index_names_a_missing_pack(backups: Backups, copy: Path) -> None:
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "deleted")
    report = Repository.open(str(copy)).rebuild_index()
    assert report.missing == [pack_name(pack)] and report.damaged == {}
    assert "which is missing" in report.points[f"beta/{backups.b1.id}"][0]


def test_rebuild_of_a_garbled_payload_is_verify_s_to_find(backups: Backups, copy: Path, tmp_path: Path) -> None:
    """rebuild-index reads trailers only: a payload flip is invisible to it, and verify --read-data finds it."""
    pack = exclusive_pack(Repository.open(str(copy)), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "garbled-data")
    lose_index(copy)
    assert Repository.open(str(copy)).rebuild_index().ok
    report = verify(Repository.open(str(copy)), read_data=True)
    assert [p.id for p in report.points if not p.ok] == [backups.b1.id]
    assert restore_bytes(copy, backups.a2, tmp_path / "a2") == backups.truth[backups.a2.id]


# -- (c) read ordering -----------------------------------------------------------------------------------

def hooked(root: Path, hooks: dict[str, Callable[[], None]]) -> Repository:
    """The repository at *root*, where the first ``list(prefix)`` of a hooked prefix takes its listing,
    *then* runs the hook (a concurrent backup landing right after that listing), then returns the listing."""
    plain = Repository.open(str(root))
    faults = [Fault("list", name=prefix, when="after", hook=hook) for prefix, hook in hooks.items()]
    return Repository(Faulty(plain.backend, *faults), plain.config, plain.url)


def concurrent_backup(root: Path, landed: list[Manifest]) -> Callable[[], None]:
    """Another host commits a new point of alpha (new packs, a new index object, then its manifest)."""
    def run() -> None:
        other = Repository.open(str(root))
        base = other.find_point("alpha", "latest")
        landed.append(commit(other, "alpha", ALPHA_SIZE, [(0, 65536, os.urandom(65536))], parent=base))
    return run


def test_verify_lists_points_before_loading_the_index(backups: Backups, copy: Path) -> None:
    """A point committed right after verify loaded the index is not verify's to see — and never 'damaged'.

    With the old order (index first, points second) the new point is listed, its blobs are not in the
    loaded index, and verify reports it damaged.
    """
    landed: list[Manifest] = []
    repo = hooked(copy, {"index/": concurrent_backup(copy, landed)})
    report = verify(repo, read_data=True)
    assert landed, "the concurrent backup did not run"
    assert report.ok, (report.repository_problems, [(p.id, p.problems) for p in report.points if not p.ok])
    assert landed[0].id not in by_id(report)
    lists = repo.backend.ops("list")  # type: ignore[attr-defined]
    assert lists.index("index/") > max(i for i, p in enumerate(lists) if p.startswith("points/"))
    assert lists.index("data/") > lists.index("index/")
    assert verify(Repository.open(str(copy)), read_data=True).ok  # and the next verify sees it, healthy


def test_verify_lists_the_index_before_the_packs(backups: Backups, copy: Path) -> None:
    """A backup landing right after the points were listed adds packs and an index verify may or may not
    see; neither its unindexed packs nor anything else of it is damage."""
    landed: list[Manifest] = []
    report = verify(hooked(copy, {"points/": concurrent_backup(copy, landed)}), read_data=True)
    assert landed and report.ok, report.repository_problems


def test_rebuild_keeps_an_index_written_after_its_listing(backups: Backups, copy: Path, tmp_path: Path) -> None:
    landed: list[Manifest] = []
    report = hooked(copy, {"data/": concurrent_backup(copy, landed)}).rebuild_index()
    assert landed and report.ok
    assert len(list(Repository.open(str(copy)).backend.list("index/"))) == 2  # the new point's index survived
    m = landed[0]
    want = apply(backups.truth[backups.a2.id], [(0, 65536, Repository.open(str(copy)).read_blob(
        m.disks["d0"].extents[0][2]))])
    assert restore_bytes(copy, m, tmp_path / "new") == want
    assert verify(Repository.open(str(copy)), read_data=True).ok


# -- the command line ------------------------------------------------------------------------------------

def test_cli_verify_and_rebuild_name_the_damaged_pack(backups: Backups, copy: Path, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    repo = str(copy)
    ok = fleece("verify", "--repo", repo, "--read-data", env=env)
    assert ok.returncode == 0 and "all ok" in ok.stdout, ok.stdout + ok.stderr
    pack = exclusive_pack(Repository.open(repo), backups.b1, [backups.a1, backups.a2])
    damage(copy, pack, "table")
    name, b1 = pack_name(pack), f"beta/{backups.b1.id}"

    v = fleece("verify", "--repo", repo, "--read-data", env=env)
    assert v.returncode == 1, v.stdout + v.stderr
    line = next(x for x in v.stdout.splitlines() if x.startswith("DAMAGED") and name in x)
    assert "garbled" in line and b1 in line
    assert f"DAMAGED beta {backups.b1.id}" in v.stdout and f"ok      alpha {backups.a2.id}" in v.stdout
    doc = json.loads(fleece("verify", "--repo", repo, "--read-data", "--json", env=env).stdout)
    assert not doc["ok"] and doc["damaged_packs"][name]["points"] == [b1]

    lose_index(copy)
    r = fleece("rebuild-index", "--repo", repo, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert any(x.startswith("DAMAGED") and name in x for x in r.stdout.splitlines())
    assert f"DAMAGED point {b1}" in r.stdout
    rj = fleece("rebuild-index", "--repo", repo, "--json", env=env)
    rdoc = json.loads(rj.stdout)
    assert rj.returncode == 1 and list(rdoc["damaged_packs"]) == [name] and list(rdoc["damaged_points"]) == [b1]

    out = tmp_path / "out"
    p = fleece("restore", "--repo", repo, "--vm", "alpha", "--out", str(out), "--flat", "--format", "raw", env=env)
    assert p.returncode == 0, p.stderr
    assert (out / "d0.raw").read_bytes() == backups.truth[backups.a2.id]
    bad = fleece("restore", "--repo", repo, "--vm", "beta", "--out", str(tmp_path / "b"), env=env)
    assert bad.returncode == 1 and "not in the repository index" in bad.stderr


def test_cli_rebuild_of_a_healthy_repository_exits_0(copy: Path, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    lose_index(copy)
    r = fleece("rebuild-index", "--repo", str(copy), env=env)
    assert r.returncode == 0 and "DAMAGED" not in r.stdout, r.stdout + r.stderr
