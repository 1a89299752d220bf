"""Restore and verify, end to end: a real VM backed up into a chain of 1 full + 4 incrementals on two
disks (one of odd size), then every point restored as a qcow2 chain and as flat qcow2/raw images and
compared with ``qemu-img compare`` to the ground truth of its freeze; then the repository is damaged in
the ways storage really fails, and verify and restore must notice."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import fleece, identical, qemu_img
from conftest import ODD_SIZE, MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import IntegrityError, Manifest, RepoConfig, Repository, UsageError
from fleece.repository.check import verify
from fleece.restore import RestoreRequest, run_restore
from fleece.repository.prune import prune
from test_backup import Recorder, backup, seed
from test_locate import handle
from vm import TestVM, random_bytes, text_bytes



@dataclass
class Chain:
    repo_dir: Path
    points: list[Manifest]
    refs: list[dict[str, Path]]  # ground truth of each point, per disk
    source_allocated: int  # bytes the source vda had allocated at the full


def allocated(image: Path) -> int:
    """Bytes of *image* that hold data in its own layer (not zero clusters, not backing; not the holes
    of an image with preallocated metadata either, which QEMU reports as data that reads as zero)."""
    out = json.loads(qemu_img("map", "--output=json", str(image)).stdout)
    return sum(e["length"] for e in out if e["data"] and not e["zero"] and e.get("depth", 0) == 0)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    work = tmp_path_factory.mktemp("chain")
    vm = TestVM(work / "vm", {"vda": 32 * MiB, "vdb": ODD_SIZE})
    vm.start()
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        repo_dir = work / "repo"
        repo = Repository.open(str(repo_dir), create=True, config=RepoConfig(pack_target=2 * MiB))
        points, refs = [], []

        def point(**kw) -> None:
            rec = Recorder(vm, kw.pop("after_freeze", None))
            res = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec, **kw))
            points.append(res.manifest)
            refs.append(rec.refs)

        seed(vm)
        vm.write("vda", 10 * MiB, text_bytes(6 * MiB, 1))
        vm.write("vdb", 12 * MiB, random_bytes(2 * MiB, 2))
        point()  # full
        src_alloc = points[0].disks["vda"].stats["dirty_bytes"]
        # inc 1: overwrite the middle of an older blob (flat restore must combine both), first/last granules
        vm.write("vda", 11 * MiB + 4096, random_bytes(100_000, 3))
        vm.write("vda", 0, b"\x01" * 512)
        vm.write("vdb", ODD_SIZE - 512, b"\x02" * 512)
        point()
        # inc 2: the guest zeroes ranges that hold older data; and writes during the backup
        vm.zero("vda", 12 * MiB, 2 * MiB)
        vm.zero("vdb", 12 * MiB + 65536, 65536)
        point(after_freeze=lambda: vm.write("vda", 20 * MiB, b"\x03" * MiB))
        # inc 3: new data over the zeroed range, a range straddling the chunk grid
        vm.write("vda", 12 * MiB + 8192, random_bytes(8192, 4))
        vm.write("vda", 16 * MiB - 10_000, text_bytes(20_000, 5))
        point()
        # inc 4: more of everything, on both disks
        vm.write("vdb", 0, random_bytes(3 * MiB, 6))
        vm.zero("vda", 0, 65536)
        point()
        assert [p.kind for p in points] == ["full"] + ["incremental"] * 4
        yield Chain(repo_dir, points, refs, src_alloc)
    finally:
        vm.cleanup()


@pytest.fixture
def repo_copy(chain: Chain, tmp_path: Path) -> Repository:
    """A private copy of the chain's repository, for tests that damage it."""
    dst = tmp_path / "repo"
    shutil.copytree(chain.repo_dir, dst)
    return Repository.open(str(dst))


@pytest.mark.parametrize("index", range(5))
def test_chain_restore_of_every_point(chain: Chain, tmp_path: Path, index: int) -> None:
    repo = Repository.open(str(chain.repo_dir))
    point = chain.points[index]
    out = tmp_path / "out"
    result = run_restore(repo, RestoreRequest(vm="testvm", out=out, point=point.id, workers=3))
    for disk in ("vda", "vdb"):
        top = out / f"{disk}.qcow2"
        identical(top, chain.refs[index][disk])
        info = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(top)).stdout)
        assert len(info) == index + 2  # empty top overlay + one layer per point
        assert info[0]["backing-filename"] == f"{disk}/{point.id}.qcow2"  # relative names only
        for layer in info[1:-1]:
            assert not layer["backing-filename"].startswith("/")
        for layer in sorted((out / disk).glob("*.qcow2")):
            assert qemu_img("check", str(layer)).returncode == 0
            assert json.loads(qemu_img("info", "--output=json", str(layer)).stdout)["cluster-size"] == 65536
        assert [d.disk for d in result.disks] == ["vda", "vdb"]
    # The restored directory is self-contained: moved elsewhere, the chain still opens.
    moved = tmp_path / "moved"
    out.rename(moved)
    identical(moved / "vdb.qcow2", chain.refs[index]["vdb"])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("index", [0, 2, 4])
def test_flat_restore(chain: Chain, tmp_path: Path, index: int, fmt: str) -> None:
    repo = Repository.open(str(chain.repo_dir))
    run_restore(repo, RestoreRequest(vm="testvm", out=tmp_path, point=chain.points[index].id, flat=True,
                                     format=fmt, workers=2))
    for disk in ("vda", "vdb"):
        identical(tmp_path / f"{disk}.{fmt}", chain.refs[index][disk], fmt)
    if fmt == "raw":
        assert (tmp_path / "vdb.raw").stat().st_size == ODD_SIZE
        assert os.stat(tmp_path / "vda.raw").st_blocks * 512 < 24 * MiB  # sparse


def test_restored_images_are_thin_and_zeros_mask_older_data(chain: Chain, tmp_path: Path) -> None:
    repo = Repository.open(str(chain.repo_dir))
    run_restore(repo, RestoreRequest(vm="testvm", out=tmp_path, point=chain.points[2].id))
    base = tmp_path / "vda" / f"{chain.points[0].id}.qcow2"
    # the base holds about the data the source had allocated, not the whole disk: in QEMU's view and on disk
    assert allocated(base) <= chain.source_allocated + 4 * 65536
    assert os.stat(base).st_blocks * 512 <= chain.source_allocated + 16 * 65536
    # the overlay of the zeroing point: zero clusters (no data) over the zeroed range, hiding older data
    overlay = tmp_path / "vda" / f"{chain.points[2].id}.qcow2"
    entries = json.loads(qemu_img("map", "--output=json", str(overlay)).stdout)
    zeroed = [e for e in entries if e["start"] <= 12 * MiB < e["start"] + e["length"]]
    assert zeroed and zeroed[0]["zero"] and not zeroed[0]["data"] and zeroed[0]["depth"] == 0
    p = subprocess.run(["qemu-io", "-r", "-c", f"read -P 0 {12 * MiB} {2 * MiB}", str(tmp_path / "vda.qcow2")],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in p.stdout and p.returncode == 0


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "chain"])
def test_a_restore_fetches_exactly_the_bytes_of_the_blobs_it_needs(chain: Chain, tmp_path: Path, flat: bool) -> None:
    """Issue #13: a restore from S3 never reads a byte of a pack it does not need — not the blobs a newer
    layer replaced that sit between needed ones, not a blob twice. Its ranged reads add up to exactly the
    stored length of each distinct blob it writes, and it reads no pack whole."""
    repo = Repository.open(str(chain.repo_dir))
    last = chain.points[-1]
    res = run_restore(repo, RestoreRequest(vm="testvm", out=tmp_path, point=last.id, flat=flat, workers=3))
    index = repo.load_index()
    for d in res.disks:
        top = repo.manifest("testvm", d.point)  # the point holding the disk's newest layer
        if flat:
            needed = {p.blob for p in repo.resolve(top, d.disk) if p.blob is not None}
        else:
            needed = {b for m in repo.disk_chain(top, d.disk) for _, _, b in m.disks[d.disk].extents if b is not None}
        assert d.stats["fetched_bytes"] == sum(index.lookup(b).length for b in needed), d.disk
        assert d.stats["blobs"] == len(needed)


def test_restore_verify_only_checks_what_the_restore_writes_and_writes_nothing(chain: Chain, tmp_path: Path) -> None:
    """``restore --verify-only``: the same blobs as the restore, decoded and checked, nothing made; a
    damaged blob fails it like the restore."""
    out = tmp_path / "never"
    p = fleece("restore", "--repo", str(chain.repo_dir), "--vm", "testvm", "--flat", "--verify-only", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verify_only"] is True and doc["mb_per_s"] > 0 and not out.exists()
    repo = Repository.open(str(chain.repo_dir))
    for disk in ("vda", "vdb"):
        needed = {q.blob for q in repo.resolve(chain.points[-1], disk) if q.blob is not None}
        assert doc["disks"][disk]["blobs"] == len(needed)
        st = doc["disks"][disk]  # every byte the flat view describes, found data or zero
        assert st["data_bytes"] + st["zero_bytes"] == sum(q.length for q in repo.resolve(chain.points[-1], disk))
    p = fleece("restore", "--repo", str(chain.repo_dir), "--vm", "testvm", "--json")
    assert p.returncode == 2 and "--verify-only" in json.loads(p.stdout)["error"]["message"]


def test_flatten_the_chain_with_qemu_img(chain: Chain, tmp_path: Path) -> None:
    repo = Repository.open(str(chain.repo_dir))
    run_restore(repo, RestoreRequest(vm="testvm", out=tmp_path / "c"))
    assert qemu_img("convert", "-O", "qcow2", str(tmp_path / "c" / "vdb.qcow2"), str(tmp_path / "f.qcow2")).returncode == 0
    identical(tmp_path / "f.qcow2", chain.refs[-1]["vdb"])


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "chain"])
def test_a_restore_never_loads_the_whole_index_and_reads_only_its_chains_hints(chain: Chain, tmp_path: Path,
                                                                               flat: bool) -> None:
    """Memory and time follow the point, not the repository: the blobs are located in the index objects
    the chain's manifests name (``Manifest.index_hints``), each read once per disk, and no other."""
    for index in (0, 4):
        point = chain.points[index]
        repo, reads = handle(chain.repo_dir)  # loading the whole index fails the test
        out = tmp_path / f"p{index}"
        run_restore(repo, RestoreRequest(vm="testvm", out=out, point=point.id, flat=flat, workers=2))
        assert repo._index is None
        for disk in ("vda", "vdb"):
            identical(out / f"{disk}.qcow2", chain.refs[index][disk])
        hints = {h for m in chain.points[:index + 1] for h in m.index_hints}
        assert hints and set(reads.index) <= hints and "index/" not in reads.listed
        assert all(n <= 2 for n in Counter(reads.index).values())  # once per disk


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "chain"])
def test_a_restore_after_a_prune_consolidated_the_index_still_restores(chain: Chain, repo_copy: Repository,
                                                                       tmp_path: Path, flat: bool) -> None:
    """Every hint stale (a prune merged the index objects into one): each listed index object is read
    once per disk instead, the whole index still never loaded."""
    prune(Repository.open(repo_copy.url))
    after = {i.name for i in repo_copy.backend.list("index/")}
    assert not after & {h for m in chain.points for h in m.index_hints}
    repo, reads = handle(Path(repo_copy.url))
    run_restore(repo, RestoreRequest(vm="testvm", out=tmp_path, point=chain.points[3].id, flat=flat))
    for disk in ("vda", "vdb"):
        identical(tmp_path / f"{disk}.qcow2", chain.refs[3][disk])
    assert set(reads.index) - after == {h for m in chain.points[:4] for h in m.index_hints}  # tried, gone
    assert Counter(n for n in reads.index if n in after) == Counter({n: 2 for n in after})


def referenced_blobs(points: list[Manifest]) -> set[bytes]:
    return {b for m in points for rec in m.disks.values() for _, _, b in rec.extents if b is not None}


def test_verify_ok(chain: Chain) -> None:
    repo = Repository.open(str(chain.repo_dir))
    for read_data in (False, True):
        report = verify(repo, read_data=read_data)
        assert report.ok, [p.problems for p in report.points]
        assert len(report.points) == 5
    assert report.blobs_checked == len(referenced_blobs(chain.points))  # each read once


def _damage_pack_of(repo: Repository, point: Manifest, disk: str = "vda") -> tuple[Path, bytes]:
    blob = next(b for _, _, b in point.disks[disk].extents if b is not None)
    loc = repo.load_index().lookup(blob)
    return Path(repo.backend.location) / f"data/{loc.pack[:2]}/{loc.pack}", blob


def test_verify_and_restore_detect_a_deleted_pack(chain: Chain, repo_copy: Repository, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    repo = repo_copy
    last = chain.points[-1]
    pack, _ = _damage_pack_of(repo, last, "vdb")
    # only packs no earlier point uses, so that earlier points stay restorable
    pack.unlink()
    report = verify(Repository.open(repo.url))
    by_id = {p.id: p for p in report.points}
    assert not by_id[last.id].ok and any(pack.name in x for x in by_id[last.id].problems)
    assert all(by_id[p.id].ok for p in chain.points[:-1])
    with pytest.raises(IntegrityError, match=f"point {last.id} disk vdb.*{pack.name}.*missing"):
        run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path / "a", point=last.id))
    assert not (tmp_path / "a" / "vdb").exists() and not (tmp_path / "a" / "vdb.qcow2").exists()
    run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path / "b", point=chain.points[3].id))
    identical(tmp_path / "b" / "vdb.qcow2", chain.refs[3]["vdb"])
    # every qemu-nbd exited when asked (this sequence used to hit qemu-nbd's lost SIGTERM wake-up)
    assert "did not exit" not in caplog.text


def test_verify_read_data_detects_a_flipped_byte(chain: Chain, repo_copy: Repository, tmp_path: Path) -> None:
    repo = repo_copy
    full = chain.points[0]
    pack, blob = _damage_pack_of(repo, full)
    loc = repo.load_index().lookup(blob)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x10
    pack.write_bytes(bytes(raw))
    assert verify(Repository.open(repo.url)).ok  # structure intact: only reading the data can tell
    report = verify(Repository.open(repo.url), read_data=True)
    assert not report.ok
    damaged = {p.id for p in report.points if not p.ok}
    assert damaged == {p.id for p in chain.points}  # every point depends on the full
    assert any(blob.hex() in x for x in next(p for p in report.points if p.id == full.id).problems)
    assert report.blobs_checked == len(referenced_blobs(chain.points)) - 1  # all but the bad one, once each
    with pytest.raises(IntegrityError, match=f"point {full.id} disk vda: blob {blob.hex()}.*pack {loc.pack}"):
        run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path, point=full.id,
                                                              flat=True))
    assert not list(tmp_path.glob("vda.*"))  # no half-written image under the final name


def test_verify_detects_a_truncated_index(chain: Chain, repo_copy: Repository) -> None:
    repo = repo_copy
    (idx,) = [i for i in repo.backend.list("index/")][:1]
    path = Path(repo.backend.location) / idx.name
    path.write_bytes(path.read_bytes()[:-7])
    report = verify(Repository.open(repo.url))
    assert not report.ok and any(idx.name in p for p in report.repository_problems)
    assert any(not p.ok for p in report.points)
    Repository.open(repo.url).rebuild_index()
    assert verify(Repository.open(repo.url), read_data=True).ok


def test_verify_detects_a_missing_parent(chain: Chain, repo_copy: Repository, tmp_path: Path) -> None:
    repo = repo_copy
    gone = chain.points[2]
    repo.backend.delete(f"points/testvm/{gone.id}")
    report = verify(Repository.open(repo.url))
    by_id = {p.id: p for p in report.points}
    for later in chain.points[3:]:
        assert not by_id[later.id].ok and any(f"parent point {gone.id}" in x for x in by_id[later.id].problems)
    for earlier in chain.points[:2]:
        assert by_id[earlier.id].ok
    with pytest.raises(IntegrityError, match=f"parent point {gone.id}.*missing"):
        run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path, point=chain.points[4].id))
    run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path / "ok", point=chain.points[1].id))
    identical(tmp_path / "ok" / "vda.qcow2", chain.refs[1]["vda"])


def test_cli_restore_and_verify(chain: Chain, tmp_path: Path) -> None:
    """The disaster-recovery case: a new HOME, no cache, nothing but the repository."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "newhome")}
    repo = str(chain.repo_dir)
    out = tmp_path / "out"
    middle = chain.points[2].id
    p = fleece("restore", "--repo", repo, "--vm", "testvm", "--point", middle[:20], "--out", str(out), "--json",
               env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["point"] == middle and doc["mode"] == "chain" and len(doc["disks"]["vda"]["layers"]) == 3
    identical(out / "vda.qcow2", chain.refs[2]["vda"])

    again = fleece("restore", "--repo", repo, "--vm", "testvm", "--out", str(out), env=env)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    forced = fleece("restore", "--repo", repo, "--vm", "testvm", "--out", str(out), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    identical(out / "vda.qcow2", chain.refs[-1]["vda"])

    flat = fleece("restore", "--repo", repo, "--vm", "testvm", "--out", str(tmp_path / "flat"), "--flat",
                  "--format", "raw", "--disk", "vdb", env=env)
    assert flat.returncode == 0, flat.stderr
    identical(tmp_path / "flat" / "vdb.raw", chain.refs[-1]["vdb"], "raw")
    assert not (tmp_path / "flat" / "vda.raw").exists()

    bad = fleece("restore", "--repo", repo, "--vm", "testvm", "--point", "20200101T000000.000Z-00000000",
                 "--out", str(tmp_path / "x"), env=env)
    assert bad.returncode == 1 and chain.points[-1].id in bad.stderr  # lists the points that exist

    v = fleece("verify", "--repo", repo, "--read-data", "--json", env=env)
    assert v.returncode == 0, v.stderr
    vdoc = json.loads(v.stdout)
    assert vdoc["ok"] and len(vdoc["points"]) == 5 and {p["status"] for p in vdoc["points"]} == {"ok"}


def test_a_point_restores_every_disk_the_vm_had(make_vm, scratch: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """After ``backup --disk vdc`` the latest point holds vdc only, yet restoring it (or any point) gives the
    whole VM: each disk at its newest layer up to that point (vda/vdb as of the full, vdc as of the point),
    through per-disk parents; ``--disk`` narrows it; verify checks the same layers; the CLI says where each
    disk's layer comes from."""
    caplog.set_level(logging.INFO)
    vm = make_vm(disks={"vda": 16 * MiB, "vdb": ODD_SIZE, "vdc": 8 * MiB})
    repo = Repository.open(str(tmp_path / "repo"), create=True, config=RepoConfig(pack_target=1 * MiB))
    vm.write("vda", 0, text_bytes(MiB, 90))
    vm.write("vda", 16 * MiB - 65536, random_bytes(65536, 91))
    vm.write("vdb", 3 * MiB, random_bytes(2 * MiB, 92))
    vm.write("vdb", ODD_SIZE - 512, b"\xee" * 512)
    vm.write("vdc", MiB, random_bytes(MiB, 93))
    full, rec0 = backup(vm, repo, scratch)
    assert sorted(full.manifest.disks) == ["vda", "vdb", "vdc"]
    # writes to every disk, but only vdc is backed up: vda's and vdb's stay out of every point
    vm.write("vda", 4 * MiB, random_bytes(MiB, 94))
    vm.write("vdb", 0, b"\x05" * 4096)
    vm.write("vdc", 0, text_bytes(65536, 95))
    p1, rec1 = backup(vm, repo, scratch, disks=["vdc"])
    vm.write("vdc", 8 * MiB - 4096, b"\x06" * 4096)
    vm.zero("vdc", MiB, 65536)
    vm.write("vda", 8 * MiB, b"\x07" * 65536)
    p2, rec2 = backup(vm, repo, scratch, disks=["vdc"])
    vm.write("vdc", 2 * MiB, random_bytes(65536, 96))
    p3, rec3 = backup(vm, repo, scratch, disks=["vdc"], full=True)  # vdc's chain no longer reaches the full
    points = [full.manifest, p1.manifest, p2.manifest, p3.manifest]
    assert [sorted(m.disks) for m in points[1:]] == [["vdc"]] * 3
    assert [m.disks["vdc"].kind for m in points] == ["full", "incremental", "incremental", "full"]
    truth = {  # per point: disk -> (point its newest layer is in, ground truth)
        m.id: {"vda": (full.manifest.id, rec0.refs["vda"]), "vdb": (full.manifest.id, rec0.refs["vdb"]),
               "vdc": (m.id, rec.refs["vdc"])}
        for m, rec in zip(points, [rec0, rec1, rec2, rec3])}

    fresh = Repository.open(repo.url)  # from the repository alone
    assert {d: m.id for d, m in fresh.point_view(fresh.find_point("testvm", None)).items()} == \
        {d: t[0] for d, t in truth[p3.manifest.id].items()}
    assert {d: m.id for d, m in fresh.point_view(fresh.find_point("testvm", None), ["vda"]).items()} == \
        {"vda": full.manifest.id}

    def restored(result, out: Path, point_id: str, ext: str = "qcow2", fmt: str | None = None) -> None:
        assert [d.disk for d in result.disks] == sorted(truth[point_id])
        for d in result.disks:
            layer_point, ref = truth[point_id][d.disk]
            assert d.point == layer_point
            identical(out / f"{d.disk}.{ext}", ref, fmt)

    # latest, chain: vda/vdb from the full (one layer), vdc a chain of its own
    out = tmp_path / "latest"
    result = run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=out))
    assert result.point.id == p3.manifest.id
    restored(result, out, p3.manifest.id)
    by_disk = {d.disk: d for d in result.disks}
    assert by_disk["vda"].layers == [out / "vda" / f"{full.manifest.id}.qcow2"]
    assert by_disk["vdc"].layers == [out / "vdc" / f"{p3.manifest.id}.qcow2"]
    assert f"disk vda: not in point {p3.manifest.id}" in caplog.text and f"from point {full.manifest.id}" in caplog.text
    # latest, flat (qcow2 and raw)
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"flat-{fmt}"
        result = run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=out, flat=True, format=fmt))
        restored(result, out, p3.manifest.id, fmt, fmt)
    # intermediate points: vdc's chain through its own parents, the others still from the full
    for m in points[1:3]:
        out = tmp_path / f"at-{m.id}"
        result = run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=out, point=m.id))
        restored(result, out, m.id)
        vdc = next(d for d in result.disks if d.disk == "vdc")
        assert [p.name for p in vdc.layers] == [f"{x.id}.qcow2" for x in points[:points.index(m) + 1]]
    out = tmp_path / "flat-p1"
    restored(run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=out, point=p1.manifest.id,
                                                                   flat=True)), out, p1.manifest.id)
    # --disk narrows (a disk of an older point, named twice), and names what exists
    out = tmp_path / "only-vda"
    result = run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=out, disks=["vda", "vda"]))
    assert [(d.disk, d.point) for d in result.disks] == [("vda", full.manifest.id)]
    identical(out / "vda.qcow2", rec0.refs["vda"])
    assert sorted(p.name for p in out.iterdir()) == ["vda", "vda.qcow2"]
    with pytest.raises(UsageError, match="no disk vdz as of point .* it had: vda, vdb, vdc"):
        run_restore(Repository.open(repo.url), RestoreRequest(vm="testvm", out=tmp_path / "x", disks=["vdz"]))

    # verify --point checks the layers of every disk as of the point: a bad vda blob in the full damages p3
    for m in points:
        assert verify(Repository.open(repo.url), vm="testvm", point=m.id, read_data=True).ok
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "repo", damaged)
    copy = Repository.open(str(damaged))
    blob = next(b for _, _, b in full.manifest.disks["vda"].extents if b is not None)
    loc = copy.load_index().lookup(blob)
    pack = damaged / f"data/{loc.pack[:2]}/{loc.pack}"
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x10
    pack.write_bytes(bytes(raw))
    (rep,) = verify(Repository.open(str(damaged)), vm="testvm", point=p3.manifest.id, read_data=True).points
    assert not rep.ok and f"depends on damaged point {full.manifest.id}" in rep.problems
    # a garbled manifest on the way makes the view unknown: restore says so; --disk of newer layers gets by
    name = damaged / f"points/testvm/{p2.manifest.id}"
    name.write_bytes(name.read_bytes().replace(b'"crash"', b'"crasH"'))
    with pytest.raises(IntegrityError, match=f"point {p2.manifest.id} of VM testvm is damaged.*--disk"):
        run_restore(Repository.open(str(damaged)), RestoreRequest(vm="testvm", out=tmp_path / "y"))
    (rep,) = verify(Repository.open(str(damaged)), vm="testvm", point=p3.manifest.id).points
    assert not rep.ok and any(f"point {p2.manifest.id} of VM testvm is damaged" in x for x in rep.problems)
    result = run_restore(Repository.open(str(damaged)), RestoreRequest(vm="testvm", out=tmp_path / "y",
                                                                       disks=["vdc"]))
    identical(tmp_path / "y" / "vdc.qcow2", rec3.refs["vdc"])

    # the CLI: latest restores all three disks, --json says which point each layer comes from
    out = tmp_path / "cli"
    p = fleece("restore", "--repo", repo.url, "--vm", "testvm", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["point"] == p3.manifest.id and doc["mode"] == "chain"
    assert {d: (v["point"], v["in_point"]) for d, v in doc["disks"].items()} == {
        "vda": (full.manifest.id, False), "vdb": (full.manifest.id, False), "vdc": (p3.manifest.id, True)}
    for disk, (layer_point, ref) in truth[p3.manifest.id].items():
        assert doc["disks"][disk]["path"] == str(out / f"{disk}.qcow2")
        assert doc["disks"][disk]["layers"] == [str(out / disk / f"{layer_point}.qcow2")]
        assert (out / disk / f"{layer_point}.qcow2").is_file()
        identical(out / f"{disk}.qcow2", ref)
    p = fleece("restore", "--repo", repo.url, "--vm", "testvm", "--point", p1.manifest.id, "--out",
               str(tmp_path / "cli-flat"), "--flat", "--format", "raw")
    assert p.returncode == 0, p.stderr
    assert f"as of point {full.manifest.id}" in p.stdout and "not in point" in p.stderr
    for disk, (_, ref) in truth[p1.manifest.id].items():
        identical(tmp_path / "cli-flat" / f"{disk}.raw", ref, "raw")
    v = fleece("verify", "--repo", repo.url, "--vm", "testvm", "--point", "latest", "--json")
    assert v.returncode == 0, v.stderr
    assert [x["id"] for x in json.loads(v.stdout)["points"]] == [p3.manifest.id]
