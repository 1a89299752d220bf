"""Incrementals that do not grow with history: no index loaded, chains bounded at the backup itself.

An incremental deduplicates against its parent chains only (``Backup._known_blobs``), so it must work
— and restore bit-exact — without reading a single index object; and once a disk's chain holds
``MAX_CHAIN`` layers the next incremental is stored merged, self-contained (``Backup._bounded``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from checks import assert_point_matches
from conftest import MiB
from fleece.exporter import backup as backup_module
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import RepoConfig, Repository
from fleece.repository.errors import IntegrityError
from test_backup import Recorder
from vm import random_bytes


def _backup(vm, repo: Repository, scratch: Path, **kw):
    rec = Recorder(vm)
    result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec, **kw))
    return result, rec


@pytest.fixture(params=["plain", "encrypted"])
def config(request) -> RepoConfig:
    return RepoConfig(pack_target=MiB) if request.param == "plain" else RepoConfig.encrypted(pack_target=MiB)


def test_incremental_reads_no_index_object(make_vm, tmp_path, scratch, config) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.write("vda", 0, random_bytes(10 * MiB, 1))  # grid cell 2 (8-12 MiB) stays unchanged
    path = tmp_path / "repo"
    repo = Repository.open(str(path), create=True, config=config)
    full, _ = _backup(vm, repo, scratch)
    # Garble every index object: whoever reads one fails. Restore below reads them after a rebuild.
    saved = {}
    for f in (path / "index").iterdir():
        saved[f] = f.read_bytes()
        f.write_bytes(b"garbage")
    vm.write("vda", 5 * MiB, random_bytes(8192, 2))
    vm.zero("vda", 1 * MiB, 65536)
    again = Repository.open(str(path))
    inc, rec = _backup(vm, again, scratch, audit_sample=0)
    assert inc.manifest.kind == "incremental"
    with pytest.raises(IntegrityError):
        Repository.open(str(path)).load_index()  # the garbage really is unreadable
    for f, data in saved.items():
        f.write_bytes(data)
    assert_point_matches(Repository.open(str(path)), inc.manifest, rec.refs)
    # A full, by contrast, loads the index (cross-VM dedup) and dedups the unchanged data against it
    again = Repository.open(str(path))
    whole, rec = _backup(vm, again, scratch, full=True)
    assert whole.stats["writer"]["dedup_blobs"] > 0
    assert_point_matches(again, whole.manifest, rec.refs)
    assert full.manifest.id < inc.manifest.id < whole.manifest.id


def test_chains_stay_bounded_without_forget(make_vm, tmp_path, scratch, monkeypatch, config) -> None:
    monkeypatch.setattr(backup_module, "MAX_CHAIN", 3)
    vm = make_vm({"vda": 16 * MiB})
    vm.write("vda", 0, random_bytes(4 * MiB, 3))
    repo = Repository.open(str(tmp_path / "repo"), create=True, config=config)
    points = []
    for i in range(7):
        result, rec = _backup(vm, repo, scratch)
        points.append((result.manifest, rec.refs))
        # each round overwrites part of an older blob: merged layers reference blob parts (skips)
        vm.write("vda", 65536 * (3 * i + 1), random_bytes(4096, 10 + i))
        vm.zero("vda", 12 * MiB + 65536 * i, 65536)
    fresh = Repository.open(str(tmp_path / "repo"))
    lengths = [len(fresh.disk_chain(fresh.manifest(m.vm, m.id), "vda")) for m, _ in points]
    assert max(lengths) <= 3, lengths
    assert lengths[:4] == [1, 2, 3, 1]  # the 4th point's chain would have had 4 layers: stored merged
    merged = fresh.manifest(points[3][0].vm, points[3][0].id).disks["vda"]
    assert merged.kind == "full" and merged.skips, "a merged layer references parts of older blobs"
    assert merged.stats["merged_from"] == [points[2][0].id, points[1][0].id, points[0][0].id]
    # Only the changes were sent, though the point is self-contained
    assert points[3][0].disks["vda"].stats["read_bytes"] < 4 * 65536 * 2
    for m, refs in points:
        assert_point_matches(fresh, fresh.manifest(m.vm, m.id), refs)
