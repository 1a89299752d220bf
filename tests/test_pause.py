"""The freeze's pause: a run SIGKILLed while it has the guest paused must not leave the VM paused, and a
guest the user paused is never resumed by fleece (exporter/pause.py).

The kills are deterministic: the run is a child process that SIGKILLs itself at an exact moment inside the
pause (the "freezing" event: guest paused, bitmaps not switched; or right after a filter went in).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checks import assert_clean, children, assert_point_matches, fleece, fleece_bitmaps, ok
from conftest import MiB
from fleece.exporter import pause
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Manifest, Repository
from vm import TestVM, random_bytes

#: The child: one backup that kills itself with SIGKILL at the moment named by argv[4].
CHILD = r"""
import os, signal, sys
from fleece.exporter import graph
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Manifest, Repository

repo, qmp, scratch, moment, guard = sys.argv[1:6]

def die():
    if guard == "killed-too":  # the guard dies with the run (the host's tools all killed together)
        me = os.getpid()
        kids = [c for t in os.listdir(f"/proc/{me}/task") for c in open(f"/proc/{me}/task/{t}/children").read().split()]
        guards = [int(c) for c in kids if b"fleece.exporter.guard" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert len(guards) == 1, guards
        os.kill(guards[0], signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

def on_event(name, data):
    if name == "freezing" and moment == "before-switch":
        assert data["paused"]
        die()

if moment == "filter-in":
    insert = graph.insert_cbw
    def insert_then_die(mon, f):
        insert(mon, f)
        die()
    graph.insert_cbw = insert_then_die

run_backup(Repository.open(repo), BackupRequest(qmp=qmp, scratch=scratch, on_event=on_event))
print("the backup finished: it was never killed")
sys.exit(3)
"""


def markers(vm: TestVM) -> list[str]:
    return [o["name"] for o in vm.guest.cmd("qom-list", {"path": "/objects"}) if o["name"].startswith(pause.MARK)]


def killed_inside_the_pause(vm: TestVM, repo_path: str, scratch: Path, moment: str, guard: str) -> None:
    child = subprocess.run([sys.executable, "-c", CHILD, repo_path, vm.qmp_path, str(scratch), moment, guard],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr


def first_point(vm: TestVM, tmp_path: Path, scratch: Path) -> tuple[str, Manifest]:
    vm.write("vda", 0, random_bytes(2 * MiB, 1))
    repo_path = str(tmp_path / "repo")
    first = run_backup(Repository.open(repo_path, create=True), BackupRequest(qmp=vm.qmp_path, scratch=str(scratch)))
    vm.write("vda", 8 * MiB, random_bytes(MiB, 2))
    return repo_path, first.manifest


def next_point_is_exact(vm: TestVM, repo_path: str, scratch: Path, first: Manifest, resumed_by_it: bool,
                        caplog: pytest.LogCaptureFixture | None = None) -> None:
    """The next run: an exact incremental on *first* (the guest wrote nothing since the kill). With
    *caplog*: run in this process, which takes the VM's lock at once (the command needs ~0.5 s to start)."""
    if caplog is None:
        p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo_path, "--scratch", str(scratch), "--json")
        doc, said = ok(p), p.stderr
    else:
        with caplog.at_level(logging.INFO):
            doc = {"id": run_backup(Repository.open(repo_path), BackupRequest(qmp=vm.qmp_path,
                                                                               scratch=str(scratch))).manifest.id}
        said = caplog.text
    assert ("resumed the guest: an interrupted backup" in said) == resumed_by_it, said
    assert vm.status() == "running"
    assert markers(vm) == []
    assert_clean(vm.guest)
    r = Repository.open(repo_path)
    point = r.manifest("testvm", doc["id"])
    assert point.kind == "incremental" and point.parent == first.id
    assert point.disks["vda"].stats["dirty_bytes"] == MiB
    assert_point_matches(r, point, vm.snapshot_refs("now"))
    assert [name for name, _ in fleece_bitmaps(vm.guest)["vda"]] == [point.disks["vda"].bitmap]
    vm.write("vda", 0, random_bytes(4096, 3))  # the guest runs: its writes land
    assert vm.status() == "running"


@pytest.mark.parametrize("moment, then", [("before-switch", "wait"), ("filter-in", "wait"),
                                          ("before-switch", "back-up-at-once")])
def test_a_run_killed_inside_the_pause_has_its_guard_resume_the_guest_at_once(make_vm, tmp_path: Path,
                                                                              scratch: Path, moment: str,
                                                                              then: str, caplog) -> None:
    """SIGKILL inside the pause: the run's pause guard resumes the guest within moments and drops the
    marker — no waiting for the next run, which may be a day away. A next run started at once waits for
    the guard (it holds the VM's lock while it may resume) instead of being refused as busy."""
    vm = make_vm({"vda": 32 * MiB})
    repo_path, first = first_point(vm, tmp_path, scratch)
    killed_inside_the_pause(vm, repo_path, scratch, moment, "alive")
    if then == "wait":
        deadline = time.monotonic() + 10
        while (vm.status(), markers(vm)) != ("running", []) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (vm.status(), markers(vm)) == ("running", [])
    next_point_is_exact(vm, repo_path, scratch, first, resumed_by_it=False,
                        caplog=caplog if then == "back-up-at-once" else None)


def test_a_run_killed_inside_the_pause_with_its_guard_leaves_a_guest_the_next_run_resumes(
        make_vm, tmp_path: Path, scratch: Path) -> None:
    vm = make_vm({"vda": 32 * MiB})
    repo_path, first = first_point(vm, tmp_path, scratch)
    killed_inside_the_pause(vm, repo_path, scratch, "before-switch", "killed-too")
    # What the kill leaves: the guest paused by a run that is gone, and the run's marker saying so.
    time.sleep(0.5)  # (what a surviving guard would have needed to act)
    assert vm.status() == "paused"
    assert len(markers(vm)) == 1
    next_point_is_exact(vm, repo_path, scratch, first, resumed_by_it=True)


def test_a_guest_the_user_paused_is_backed_up_and_stays_paused(make_vm, tmp_path: Path, scratch: Path) -> None:
    vm = make_vm({"vda": 32 * MiB})
    vm.write("vda", 3 * MiB, random_bytes(MiB, 4))
    vm.guest.cmd("stop")
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    events: list[tuple[str, dict]] = []
    result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                            on_event=lambda n, d: events.append((n, d))))
    assert ("freezing", {"point": result.manifest.id, "paused": False}) in events
    assert vm.status() == "paused"
    assert markers(vm) == []  # fleece never paused it, so there is nothing of fleece's to undo
    assert_point_matches(repo, result.manifest, vm.snapshot_refs("now"))
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(tmp_path / "repo"), "--scratch", str(scratch))
    assert p.returncode == 0, p.stderr
    assert "resumed" not in p.stderr
    assert vm.status() == "paused"
    vm.guest.cmd("cont")
    assert_clean(vm.guest)


class FakeMonitor:
    """QEMU's answers to the three commands recovery sends (the real ones are exercised above)."""

    def __init__(self, status: str, objects: list[str]) -> None:
        self.status = status
        self.objects = objects
        self.sent: list[str] = []

    def cmd(self, name: str, args: dict | None = None):
        self.sent.append(name)
        if name == "qom-list":
            return [{"name": "type", "type": "string"}] + [{"name": o, "type": "child<secret>"} for o in self.objects]
        if name == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if name == "object-del":
            self.objects.remove(args["id"])
            return {}
        if name == "cont":
            self.status = "running"
            return {}
        raise AssertionError(name)


@pytest.mark.parametrize("status", ["io-error", "shutdown", "inmigrate", "postmigrate", "guest-panicked"])
def test_a_marker_on_a_guest_in_another_state_is_dropped_and_the_guest_left_alone(status: str) -> None:
    mon = FakeMonitor(status, [f"{pause.MARK}20261202T000000.000Z-00000000", "pc.ram"])
    lines = pause.recover(mon)  # type: ignore[arg-type]
    assert "cont" not in mon.sent
    assert mon.status == status and mon.objects == ["pc.ram"]
    assert len(lines) == 1 and f"now '{status}'" in lines[0] and "resume it yourself" in lines[0]


def test_a_marker_on_a_running_guest_is_dropped_silently() -> None:
    mon = FakeMonitor("running", [f"{pause.MARK}20261202T000000.000Z-00000000"])
    assert pause.recover(mon) == []  # type: ignore[arg-type]
    assert "cont" not in mon.sent and mon.objects == []
    assert pause.recover(FakeMonitor("paused", ["pc.ram"])) == []  # type: ignore[arg-type]  # no marker: not ours


def test_the_pause_guard_carries_no_credentials(make_vm, tmp_path: Path, scratch: Path, monkeypatch) -> None:
    """The guard lives as long as the run (longer, if it acts): its /proc environ must not show the
    repository's password or S3 keys, which it never needs."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-for-the-guard-test")
    vm = make_vm({"vda": 16 * MiB})
    seen: list[bytes] = []

    def on_event(name: str, data: dict) -> None:
        if name == "freezing":
            seen.extend(Path(f"/proc/{c}/environ").read_bytes() for c in children(os.getpid())
                        if b"fleece.exporter.guard" in Path(f"/proc/{c}/cmdline").read_bytes())

    repo = Repository.open(str(tmp_path / "repo"), create=True)
    run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=on_event))
    assert len(seen) == 1, "no pause guard ran during the pause"
    assert os.environ["FLEECE_PASSWORD"].encode() not in seen[0]
    assert b"s3-secret-for-the-guard-test" not in seen[0] and b"PATH=" in seen[0]
