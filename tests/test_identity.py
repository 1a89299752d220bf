"""One QEMU, one fleece at a time; a VM's history belongs to one machine (DESIGN §5).

Found before: a second ``fleece backup`` of the same QEMU through another monitor "cleaned up after an
interrupted run" and tore down the first, live run; two VMs started with the same ``-name`` mixed into
one history (every run a full with a false reason; ``restore`` returned whichever ran last).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from checks import assert_clean, assert_point_matches, fleece, fleece_bitmaps
from conftest import MiB
from exporter.backup import BackupRequest, run_backup
from exporter.errors import BackupBusyError
from exporter.identity import IdentityError
from exporter.qmp import Monitor
from repository import Repository
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
