"""End-to-end backups of a real QEMU VM (TCG, no guest OS) through real NBD into a real repository.

Every point is compared byte for byte, over the whole virtual disk, with the ground truth copied at the
instant the point was frozen (the ``frozen`` event): writes made after that must be absent, zeroed
ranges must read back as zeros, the first and last granule of each disk (one of odd size) must match.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

import pytest

from checks import assert_clean, assert_point_matches, fleece_bitmaps, identical
from faults import Fault, Faulty
from conftest import MiB, ODD_SIZE
from fleece.exporter.backup import BackupRequest, BackupResult, run_backup
from fleece.repository import RepoConfig, Repository
from fleece.repository.errors import PermanentBackendError, RepositoryError
from fleece.restore import RestoreRequest, run_restore
from vm import TestVM, random_bytes, text_bytes


_snapshots = itertools.count(1)  # unique names for ground-truth copies (ids of objects get reused)


class Recorder:
    """Snapshot the ground truth at the freeze; optionally act (guest writes) right after it."""

    def __init__(self, vm: TestVM, after_freeze=None, before_pull=None) -> None:
        self.vm = vm
        self.refs: dict[str, Path] = {}
        self.after_freeze = after_freeze
        self.before_pull = before_pull
        self.events: list[str] = []

    def __call__(self, name: str, data: dict) -> None:
        self.events.append(name)
        if name == "frozen":
            self.refs = self.vm.snapshot_refs(f"point{next(_snapshots)}")
            if self.after_freeze:
                self.after_freeze()
        if name == "disk" and self.before_pull:
            self.before_pull(data)


def backup(vm: TestVM, repo: Repository, scratch: Path, **kw) -> tuple[BackupResult, Recorder]:
    rec = Recorder(vm, kw.pop("after_freeze", None), kw.pop("before_pull", None))
    result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec, **kw))
    return result, rec


def check(vm: TestVM, repo: Repository, result: BackupResult, rec: Recorder) -> None:
    assert_point_matches(repo, result.manifest, {d: rec.refs[d] for d in result.manifest.disks})
    assert_clean(vm.guest)


def seed(vm: TestVM) -> None:
    """Data everywhere that matters: first and last granule, a chunk boundary, text and random."""
    vm.write("vda", 0, text_bytes(MiB, 1))
    vm.write("vda", 4 * MiB - 4096, random_bytes(8192, 2))  # straddles the 4 MiB grid line
    vm.write("vda", 32 * MiB - 65536, random_bytes(65536, 3))
    vm.write("vdb", 5 * MiB, random_bytes(3 * MiB, 4))
    vm.write("vdb", ODD_SIZE - 512, b"\xee" * 512)  # the very last sector of the odd-sized disk


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    # Small packs so that one backup of a few MiB spans several packs (exercises mid-run upload failures).
    return Repository.open(str(tmp_path / "repo"), create=True, config=RepoConfig(pack_target=1 * MiB))


def test_full_then_incrementals_are_exact(make_vm, repo, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    vm = make_vm()
    seed(vm)
    full, rec = backup(vm, repo, scratch)
    assert full.manifest.kind == "full" and full.manifest.parent is None
    assert {d.kind for d in full.manifest.disks.values()} == {"full"}
    check(vm, repo, full, rec)
    assert "full backup (no earlier point" in caplog.text
    assert full.stats["pause_ms"] < 1000

    # Scattered writes, including the first and last granule of each disk; sub-granule writes.
    vm.write("vda", 0, b"A" * 512)
    vm.write("vda", 32 * MiB - 512, b"Z" * 512)
    vm.write("vda", 17 * MiB - 100, random_bytes(5000, 5))  # straddles two granules
    vm.write("vdb", 0, text_bytes(4096, 6))
    vm.write("vdb", ODD_SIZE - 4608, random_bytes(4608, 7))  # the last, partial granule
    inc, rec = backup(vm, repo, scratch)
    assert inc.manifest.kind == "incremental" and inc.manifest.parent == full.manifest.id
    check(vm, repo, inc, rec)
    vda = inc.manifest.disks["vda"].stats
    assert vda["dirty_bytes"] == 4 * 65536  # 3 writes, one of them over two granules
    # only the dirty granules were read, not the disk
    assert vda["read_bytes"] == vda["dirty_bytes"]
    assert inc.stats["writer"]["raw_bytes"] <= 8 * 65536

    # The old bitmap is gone, the new one records; nothing else of ours is left.
    bitmaps = fleece_bitmaps(vm.guest)
    assert bitmaps["vda"] == [(inc.manifest.disks["vda"].bitmap, True)]
    assert bitmaps["vdb"] == [(inc.manifest.disks["vdb"].bitmap, True)]

    # Nothing written since: an empty incremental is valid and exact.
    empty, rec = backup(vm, repo, scratch)
    assert all(d.extents == [] for d in empty.manifest.disks.values())
    check(vm, repo, empty, rec)


def test_writes_during_backup_are_absent_then_present(make_vm, repo, scratch) -> None:
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)

    vm.write("vda", 8 * MiB, random_bytes(MiB, 10))  # dirty before the freeze: in this point

    def during_freeze() -> None:  # after the point in time, before any read
        vm.write("vda", 8 * MiB, b"\x01" * MiB)  # overwrites dirty data not yet read: CBW must save it
        vm.write("vda", 0, b"\x02" * 65536)  # clean data (previous point) overwritten
        vm.write("vdb", 10 * MiB, b"\x03" * 4096)

    writer_errors: list[BaseException] = []

    def during_pull(data: dict) -> None:
        # A concurrent guest, from its own thread and monitor, while the pull reads.
        def guest() -> None:
            try:
                for i in range(16):
                    vm.write("vdb", i * MiB, random_bytes(65536, 100 + i))
            except BaseException as exc:  # noqa: BLE001
                writer_errors.append(exc)
        t = threading.Thread(target=guest)
        t.start()
        threads.append(t)

    threads: list[threading.Thread] = []
    inc, rec = backup(vm, repo, scratch, after_freeze=during_freeze, before_pull=during_pull)
    for t in threads:
        t.join()
    assert not writer_errors
    check(vm, repo, inc, rec)  # none of the writes after the freeze are in the point

    nxt, rec2 = backup(vm, repo, scratch)
    check(vm, repo, nxt, rec2)  # ...and all of them are in the next one
    assert nxt.manifest.disks["vda"].stats["dirty_bytes"] >= MiB + 65536


def test_zeroed_ranges_become_zero_entries(make_vm, repo, scratch) -> None:
    vm = make_vm()
    seed(vm)
    vm.write("vda", 12 * MiB, random_bytes(2 * MiB, 20))
    backup(vm, repo, scratch)
    vm.zero("vda", 12 * MiB, 2 * MiB)  # guest zeroes data that exists in the previous point
    vm.zero("vdb", 5 * MiB, 65536)
    inc, rec = backup(vm, repo, scratch)
    check(vm, repo, inc, rec)
    vda = inc.manifest.disks["vda"]
    assert (12 * MiB, 2 * MiB, None) in vda.extents
    assert vda.stats["zero_bytes"] == 2 * MiB
    assert inc.stats["writer"]["raw_bytes"] == 0  # zeroes transfer nothing
    assert (5 * MiB, 65536, None) in inc.manifest.disks["vdb"].extents


def test_worker_counts_give_identical_points(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    seed(vm)
    maps = []
    for workers in (1, 8):
        r = Repository.open(str(tmp_path / f"repo{workers}"), create=True)
        result, rec = backup(vm, r, scratch, workers=workers, full=True)
        check(vm, r, result, rec)
        maps.append({d: rec_.extents for d, rec_ in result.manifest.disks.items()})
    assert maps[0] == maps[1]


def test_failed_upload_rolls_back_and_next_incremental_is_exact(make_vm, repo, scratch, caplog) -> None:
    vm = make_vm()
    seed(vm)
    full, _ = backup(vm, repo, scratch)
    before = fleece_bitmaps(vm.guest)

    vm.write("vda", 2 * MiB, random_bytes(3 * MiB, 30))  # several packs' worth
    # The second pack upload fails, and every one after it: the repository went away mid-run.
    faulty = Faulty(repo.backend, Fault("put", prefix="data/", skip=1, times=None,
                                        error=lambda: PermanentBackendError("injected: the repository went away")))
    with pytest.raises(PermanentBackendError, match="injected"):
        backup(vm, Repository(faulty, repo.config, repo.url), scratch,
               after_freeze=lambda: vm.write("vdb", 0, b"\x05" * 65536))
    assert len(faulty.ops("put")) >= 2
    assert repo.point_ids("testvm") == [full.manifest.id]  # no half-written point
    assert fleece_bitmaps(vm.guest) == before  # new bitmap folded back into the old, old recording again
    assert_clean(vm.guest)

    inc, rec = backup(vm, repo, scratch)
    assert inc.manifest.parent == full.manifest.id
    check(vm, repo, inc, rec)  # includes the writes before and during the failed run


def test_interrupt_rolls_back(make_vm, repo, scratch) -> None:
    """Ctrl-C (KeyboardInterrupt, also what SIGTERM becomes) right after the freeze."""
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    before = fleece_bitmaps(vm.guest)
    vm.write("vda", MiB, b"\x07" * 65536)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backup(vm, repo, scratch, after_freeze=interrupt)
    assert fleece_bitmaps(vm.guest) == before
    assert_clean(vm.guest)
    inc, rec = backup(vm, repo, scratch)
    check(vm, repo, inc, rec)


def test_crash_after_commit_keeps_the_point(make_vm, repo, scratch, caplog) -> None:
    """Killed between the manifest write and dropping the old bitmap: the next run finishes the commit."""
    caplog.set_level(logging.INFO)
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    vm.write("vda", 3 * MiB, b"\x09" * 65536)

    class Killed(BaseException):
        pass

    rec = Recorder(vm)

    def hook(name: str, data: dict) -> None:
        rec(name, data)
        if name == "committed":
            raise Killed

    with pytest.raises(Killed):
        run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=hook))
    committed = repo.latest("testvm")
    assert len([b for b in fleece_bitmaps(vm.guest)["vda"]]) == 2  # old (disabled) and new
    vm.write("vda", 5 * MiB, b"\x0a" * 65536)
    nxt, rec2 = backup(vm, repo, scratch)
    assert "was committed by an interrupted run" in caplog.text
    assert nxt.manifest.parent == committed.id and nxt.manifest.kind == "incremental"
    check(vm, repo, nxt, rec2)
    assert nxt.manifest.disks["vda"].stats["dirty_bytes"] == 65536


def test_qemu_killed_falls_back_to_full(make_vm, repo, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    vm.write("vda", 6 * MiB, random_bytes(65536, 40))
    for d in vm.disks.values():
        vm._qemu_io(d, "flush")  # what a guest does; kill -9 must not lose acknowledged+flushed writes
    vm.kill()
    vm.start()
    result, rec = backup(vm, repo, scratch)
    assert result.manifest.kind == "full"
    assert "is gone (QEMU was restarted without a clean shutdown" in caplog.text
    check(vm, repo, result, rec)


def test_clean_restart_keeps_incrementals(make_vm, repo, scratch) -> None:
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    vm.write("vdb", 7 * MiB, random_bytes(65536, 50))
    vm.quit()  # persistent bitmaps are stored in the qcow2s
    vm.start()
    vm.write("vdb", 9 * MiB, random_bytes(65536, 51))
    result, rec = backup(vm, repo, scratch)
    assert result.manifest.kind == "incremental"
    assert result.manifest.disks["vdb"].stats["dirty_bytes"] == 2 * 65536
    check(vm, repo, result, rec)


def test_resized_disk_gets_a_full(make_vm, repo, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    vm.resize("vdb", ODD_SIZE + 8 * MiB)
    vm.write("vdb", ODD_SIZE + 4 * MiB, random_bytes(65536, 60))
    vm.write("vda", 0, b"\x0b" * 4096)
    result, rec = backup(vm, repo, scratch)
    assert result.manifest.disks["vdb"].kind == "full"
    assert result.manifest.disks["vda"].kind == "incremental"
    assert "disk resized from" in caplog.text
    check(vm, repo, result, rec)
    result2, rec2 = backup(vm, repo, scratch)  # and the chain goes on incrementally from there
    assert {d.kind for d in result2.manifest.disks.values()} == {"incremental"}
    check(vm, repo, result2, rec2)


def test_full_flag_and_disk_selection(make_vm, repo, scratch) -> None:
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    only, rec = backup(vm, repo, scratch, disks=["vdb"], full=True)
    assert list(only.manifest.disks) == ["vdb"] and only.manifest.kind == "full"
    check(vm, repo, only, rec)
    # vdb's older bitmap was dropped with the commit; vda's bitmap is untouched
    assert len(fleece_bitmaps(vm.guest)["vdb"]) == 1
    assert len(fleece_bitmaps(vm.guest)["vda"]) == 1


def test_disk_subset_backup_keeps_the_other_disks_incremental(make_vm, repo, scratch, tmp_path) -> None:
    """``--disk vda`` leaves vdb's bitmap alone: vdb's next layer builds on the last point that holds it."""
    vm = make_vm()
    seed(vm)
    first, _ = backup(vm, repo, scratch)
    vm.write("vda", 2 * MiB, random_bytes(65536, 70))
    vm.write("vdb", 1 * MiB, random_bytes(65536, 71))
    only, rec = backup(vm, repo, scratch, disks=["vda"])
    assert list(only.manifest.disks) == ["vda"] and only.manifest.kind == "incremental"
    assert only.manifest.disks["vda"].parent == first.manifest.id
    check(vm, repo, only, rec)
    vm.write("vdb", 9 * MiB, random_bytes(65536, 72))
    vm.write("vda", 6 * MiB, random_bytes(65536, 73))
    both, rec = backup(vm, repo, scratch)
    vda, vdb = both.manifest.disks["vda"], both.manifest.disks["vdb"]
    assert vda.kind == vdb.kind == "incremental"
    assert (vda.parent, vdb.parent) == (only.manifest.id, first.manifest.id)
    assert vdb.stats["dirty_bytes"] == 2 * 65536  # both of vdb's writes since the first point, nothing else
    assert both.manifest.parent == only.manifest.id
    check(vm, repo, both, rec)
    assert [m.id for m in repo.disk_chain(both.manifest, "vdb")] == [both.manifest.id, first.manifest.id]
    reopened = Repository.open(repo.url)  # the per-disk parent survives the manifest round trip
    assert reopened.manifest("testvm", both.manifest.id).disk_parent("vdb") == first.manifest.id
    out = tmp_path / "restored"
    run_restore(reopened, RestoreRequest(vm="testvm", out=out, point=both.manifest.id))  # chain: vdb skips a point
    for disk in ("vda", "vdb"):
        identical(out / f"{disk}.qcow2", rec.refs[disk])


def test_scratch_full_fails_the_backup_not_the_guest(make_vm, repo, scratch, tmpfs) -> None:
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    small = tmpfs("1M")
    vm.write("vda", 20 * MiB, random_bytes(4 * MiB, 70))

    def guest_overwrites_everything() -> None:
        # Needs ~4 MiB of copy-before-write space; the scratch has 1 MiB. The guest's writes must succeed.
        vm.write("vda", 20 * MiB, b"\x0c" * (4 * MiB))

    with pytest.raises(Exception, match="scratch directory .* is full") as err:
        backup(vm, repo, small, after_freeze=guest_overwrites_everything)
    print(err.value)
    assert vm.status() == "running"
    assert_clean(vm.guest)
    inc, rec = backup(vm, repo, scratch)
    check(vm, repo, inc, rec)


def test_repository_full_fails_cleanly(make_vm, scratch, tmpfs) -> None:
    vm = make_vm()
    seed(vm)
    repo = Repository.open(str(tmpfs("2M") / "repo"), create=True)
    before = fleece_bitmaps(vm.guest)
    vm.write("vda", 0, random_bytes(6 * MiB, 80))  # incompressible: does not fit
    with pytest.raises(RepositoryError, match="free some space"):
        backup(vm, repo, scratch)
    assert fleece_bitmaps(vm.guest) == before
    assert_clean(vm.guest)
    assert repo.point_ids("testvm") == []
