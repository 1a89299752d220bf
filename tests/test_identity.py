"""One QEMU, one fleece at a time; a VM's history belongs to one machine (DESIGN §5).

Found before: a second ``fleece backup`` of the same QEMU through another monitor "cleaned up after an
interrupted run" and tore down the first, live run; two VMs started with the same ``-name`` mixed into
one history (every run a full with a false reason; ``restore`` returned whichever ran last).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from checks import assert_clean, assert_point_matches, fleece, fleece_bitmaps
from conftest import MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository.errors import BackupBusyError
from fleece.exporter.identity import IdentityError
from fleece.exporter.qmp import Monitor
from fleece.repository import Repository
from fleece.repository.errors import UsageError
from test_backup import Recorder, backup, seed
from vm import random_bytes


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(str(tmp_path / "repo"), create=True)


def test_second_run_through_another_monitor_is_refused_and_leaves_the_live_run_alone(make_vm, repo, scratch,
                                                                                    tmp_path) -> None:
    vm = make_vm()
    seed(vm)
    backup(vm, repo, scratch)
    vm.write("vda", 2 * MiB, random_bytes(MiB, 1))
    other_repo = Repository.open(str(tmp_path / "other"), create=True)
    refused: list[BaseException] = []

    def second_run(data: dict) -> None:
        # The first run's fleece and exports are live now. Another fleece comes in through the VM's other
        # monitor (which the test's guest holds: borrow it) with another name and another repository.
        assert vm.guest is not None
        vm.guest.close()
        try:
            run_backup(other_repo, BackupRequest(qmp=vm.guest_qmp_path, vm="other", scratch=str(scratch)))
        except BackupBusyError as exc:
            refused.append(exc)
        finally:
            vm.guest = Monitor(vm.guest_qmp_path)
        vm.write("vda", 2 * MiB, b"\x0f" * 65536)  # and the guest goes on writing: must be absent

    inc, rec = backup(vm, repo, scratch, before_pull=second_run)
    assert len(refused) == 2  # one "disk" event per disk, both refused
    assert "another fleece backup" in str(refused[0]) and "QEMU process" in str(refused[0])
    assert other_repo.point_ids("other") == []
    assert inc.manifest.kind == "incremental"
    assert_point_matches(repo, inc.manifest, rec.refs)
    assert_clean(vm.guest)


def test_two_machines_with_one_name_never_share_a_history(make_vm, repo, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    first = make_vm(name="web1")
    seed(first)
    one, _ = backup(first, repo, scratch)
    second = make_vm(name="web1")  # another machine (other disks), same -name
    seed(second)
    before = fleece_bitmaps(second.guest)
    with pytest.raises(IdentityError, match="belongs to another machine.*--vm NAME.*--adopt"):
        backup(second, repo, scratch)
    assert repo.point_ids("web1") == [one.manifest.id]
    assert fleece_bitmaps(second.guest) == before  # nothing done to the second VM
    assert_clean(second.guest)

    # Its own name gives it its own history; the first machine's history goes on incrementally.
    rec = Recorder(second)
    own = run_backup(repo, BackupRequest(qmp=second.qmp_path, vm="web1-b", scratch=str(scratch), on_event=rec))
    assert own.manifest.kind == "full"
    assert_point_matches(repo, own.manifest, rec.refs)
    first.write("vda", 0, b"\x01" * 4096)
    inc, rec = backup(first, repo, scratch)
    assert inc.manifest.kind == "incremental" and inc.manifest.parent == one.manifest.id
    assert_point_matches(repo, inc.manifest, rec.refs)

    # --adopt: "this is the same machine, moved" continues the history (a full: its bitmaps differ).
    adopted, rec = backup(second, repo, scratch, adopt=True)
    assert "continues the history of VM 'web1'" in caplog.text
    assert adopted.manifest.kind == "full"
    assert_point_matches(repo, adopted.manifest, rec.refs)


def test_uuid_decides_when_set(make_vm, repo, scratch, tmp_path) -> None:
    a = make_vm(name="db", start=False)
    a.uuid = "6c0c4d6a-2f1b-4a57-9a0e-0d2f8e6b1a01"
    a.start()
    seed(a)
    backup(a, repo, scratch)
    b = make_vm(name="db", start=False)
    b.uuid = "6c0c4d6a-2f1b-4a57-9a0e-0d2f8e6b1a02"
    b.start()
    with pytest.raises(IdentityError, match="uuid 6c0c4d6a-2f1b-4a57-9a0e-0d2f8e6b1a01"):
        backup(b, repo, scratch)
    # The same UUID on other disk files (say, the VM restored onto new storage) is the same machine.
    c = make_vm(name="db", start=False)
    c.uuid = a.uuid
    a.kill()
    c.start()
    seed(c)
    moved, rec = backup(c, repo, scratch)
    assert_point_matches(repo, moved.manifest, rec.refs)

    # And through the command: one line, exit 1, what to do.
    p = fleece("backup", "--qmp", b.qmp_path, "--repo", repo.url, "--scratch", str(scratch))
    assert p.returncode == 1
    assert "belongs to another machine" in p.stderr and "Traceback" not in p.stderr


def test_a_name_taken_by_another_machine_during_a_run_fails_that_run(make_vm, repo, scratch) -> None:
    """Two machines' first backups under one name at once: the second to commit is refused, cleanly."""
    first = make_vm(name="race")
    second = make_vm(name="race")
    seed(first)
    seed(second)
    before = fleece_bitmaps(first.guest)
    taken: list[str] = []

    def hook(name: str, data: dict) -> None:
        if name == "committing" and not taken:
            taken.append(run_backup(repo, BackupRequest(qmp=second.qmp_path, scratch=str(scratch))).manifest.id)

    with pytest.raises(IdentityError, match="belongs to another machine"):
        run_backup(repo, BackupRequest(qmp=first.qmp_path, scratch=str(scratch), on_event=hook))
    assert repo.point_ids("race") == taken
    assert fleece_bitmaps(first.guest) == before  # rolled back: no bitmap of the refused point stays
    assert_clean(first.guest)


def test_disk_images_swapped_between_disks_get_fulls_not_each_others_chain(make_vm, repo, scratch) -> None:
    """Two equal disks whose images trade places (two -drive options reordered): each disk's bitmap names
    its disk, so neither builds an incremental on the other's chain."""
    vm = make_vm(disks={"vda": 8 * MiB, "vdb": 8 * MiB})
    vm.write("vda", MiB, random_bytes(MiB, 1))
    vm.write("vdb", 3 * MiB, random_bytes(MiB, 2))
    backup(vm, repo, scratch)
    vm.quit()
    a, b = vm.disks["vda"], vm.disks["vdb"]
    for x, y in ((a.image, b.image), (a.reference, b.reference)):  # the ground truth moves with the bytes
        tmp = x.with_name("swap")
        x.rename(tmp)
        y.rename(x)
        tmp.rename(y)
    vm.start()
    vm.write("vda", 5 * MiB, b"\x03" * 65536)
    result, rec = backup(vm, repo, scratch, audit_sample=0)  # the bitmap names alone decide, not the audit
    assert {d: r.kind for d, r in result.manifest.disks.items()} == {"vda": "full", "vdb": "full"}
    assert_point_matches(repo, result.manifest, rec.refs)


def test_a_drive_no_device_uses_is_skipped_and_refused_by_name(make_vm, repo, scratch, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    spare = tmp_path / "spare.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(spare), "8M"], check=True)
    vm = make_vm(start=False)
    vm.extra_args = ["-drive", f"file={spare},if=none,id=spare0"]
    vm.start()
    seed(vm)
    result, rec = backup(vm, repo, scratch)
    assert set(result.manifest.disks) == {"vda", "vdb"}
    assert "skipping drive spare0" in caplog.text
    assert_point_matches(repo, result.manifest, rec.refs)
    with pytest.raises(UsageError, match="spare0 is not attached to any guest device"):
        backup(vm, repo, scratch, disks=["spare0"])
    assert_clean(vm.guest)


def test_what_makes_two_machines_one(tmp_path) -> None:
    """Unit level (the QMP side is faked): what an identity is made of."""
    from fleece.exporter.identity import Machine
    from fleece.exporter.inventory import DiskInfo, VmInfo

    class FakeMon:
        peer_pid = os.getpid()

        def cmd(self, name: str) -> dict:
            return {"UUID": "00000000-0000-0000-0000-000000000000"}

    def disk(i: str, filename: str, ro: bool = False) -> DiskInfo:
        return DiskInfo(id=i, qdev=f"/machine/peripheral/{i}", node=f"n-{i}", driver="qcow2", virtual_size=1,
                        filename=filename, read_only=ro)

    iso = "/srv/iso/debian.iso"
    a = Machine.of(FakeMon(), VmInfo("web", "running", [disk("vda", "/vm/a.qcow2"), disk("cd0", iso, ro=True)]))
    b = Machine.of(FakeMon(), VmInfo("web", "running", [disk("vda", "/vm/b.qcow2"), disk("cd0", iso, ro=True)]))
    assert a.uuid is None and "cd0" not in a.images
    assert not a.same_as(b)
    rel = Machine.of(FakeMon(), VmInfo("web", "running", [disk("vda", "disk.qcow2")]))
    assert rel.images["vda"] == [os.path.realpath(os.path.join(os.getcwd(), "disk.qcow2"))]

    # A writable disk two machines share (share-rw=on) does not make them one: their own disks differ.
    shared_a = Machine.of(FakeMon(), VmInfo("n", "running", [disk("vda", "/vm/a.qcow2"), disk("vdb", "/vm/shared.raw")]))
    shared_b = Machine.of(FakeMon(), VmInfo("n", "running", [disk("vda", "/vm/b.qcow2"), disk("vdb", "/vm/shared.raw")]))
    assert not shared_a.same_as(shared_b)
    # An external snapshot (the old image becomes the backing file) is the same machine.
    snap = DiskInfo(id="vda", qdev="/machine/peripheral/vda", node="n", driver="qcow2", virtual_size=1,
                    filename="/vm/a.ov.qcow2", read_only=False, chain=["/vm/a.ov.qcow2", "/vm/a.qcow2"])
    assert Machine.of(FakeMon(), VmInfo("web", "running", [snap])).same_as(a)
    # Identities recorded with one file per disk (before chains were recorded) still compare.
    assert Machine.from_json({"uuid": None, "host": a.host, "images": {"vda": "/vm/a.qcow2"}}).same_as(a)


def test_backup_works_when_the_qemu_process_is_not_visible(make_vm, repo, scratch, monkeypatch) -> None:
    """In another pid namespace SO_PEERCRED gives no pid: the fallback lock must not refuse fleece itself."""
    monkeypatch.setattr(Monitor, "_peer_pid", lambda self: None)
    vm = make_vm()
    seed(vm)
    result, rec = backup(vm, repo, scratch)
    assert_point_matches(repo, result.manifest, rec.refs)


def test_bitmaps_named_by_an_older_fleece_give_one_full_then_incrementals(make_vm, repo, scratch,
                                                                        monkeypatch) -> None:
    """A bitmap named before bitmaps carried a disk token (one name for every disk of a point) cannot
    prove which disk it tracks — after swapped images it would be the other disk's — so the first backup
    after the upgrade is a full (deduplicated), and the chain goes on incrementally from there."""
    from fleece.exporter import bitmaps

    new_name = bitmaps.bitmap_name
    monkeypatch.setattr(bitmaps, "bitmap_name", lambda repo_id, point_id, disk_id: f"{bitmaps.repo_prefix(repo_id)}{point_id}")
    vm = make_vm(disks={"vda": 8 * MiB, "vdb": 8 * MiB})
    vm.write("vda", MiB, random_bytes(MiB, 1))
    vm.write("vdb", 3 * MiB, random_bytes(MiB, 2))
    old, _ = backup(vm, repo, scratch)
    assert old.manifest.disks["vda"].bitmap == old.manifest.disks["vdb"].bitmap  # the old naming
    monkeypatch.setattr(bitmaps, "bitmap_name", new_name)
    vm.quit()
    a, b = vm.disks["vda"], vm.disks["vdb"]  # and the images trade places (two -drive options reordered)
    for x, y in ((a.image, b.image), (a.reference, b.reference)):
        tmp = x.with_name("swap")
        x.rename(tmp)
        y.rename(x)
        tmp.rename(y)
    vm.start()
    vm.write("vda", 5 * MiB, random_bytes(65536, 5))
    first, rec = backup(vm, repo, scratch, audit_sample=0, adopt=True)  # adopt: the identity changed too
    assert {d: r.kind for d, r in first.manifest.disks.items()} == {"vda": "full", "vdb": "full"}
    assert "predates per-disk bitmap names" in first.manifest.disks["vda"].stats["reason"]
    assert first.stats["writer"]["new_blobs"] <= 1  # only the changed cell is new
    assert_point_matches(repo, first.manifest, rec.refs)
    vm.write("vdb", 0, b"\x09" * 4096)
    inc, rec = backup(vm, repo, scratch)
    assert {d.kind for d in inc.manifest.disks.values()} == {"incremental"}
    assert inc.manifest.disks["vda"].bitmap != inc.manifest.disks["vdb"].bitmap
    assert_point_matches(repo, inc.manifest, rec.refs)
    assert fleece_bitmaps(vm.guest) == {d: [(inc.manifest.disks[d].bitmap, True)] for d in ("vda", "vdb")}
