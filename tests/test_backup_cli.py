"""The ``fleece backup`` / ``fleece list`` commands as users and scripts run them: exit codes, one-line
errors that say what to do, ``--json`` documents, and a run killed with SIGKILL mid-way."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from checks import FLEECE, assert_clean, assert_point_matches, fleece, fleece_bitmaps
from conftest import ODD_SIZE, MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import RepoConfig, Repository
from test_backup import Recorder, seed
from vm import random_bytes



def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_backup_and_list_json(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    seed(vm)
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["kind"] == "full" and doc["vm"] == "testvm" and doc["parent"] is None
    assert set(doc["disks"]) == {"vda", "vdb"}
    assert doc["disks"]["vda"]["stored_bytes"] > 0 and doc["uploaded_bytes"] > 0
    vm.write("vda", 0, b"x" * 4096)
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json", "--workers", "2")
    assert p.returncode == 0, p.stderr
    inc = json.loads(p.stdout)
    assert inc["kind"] == "incremental" and inc["parent"] == doc["id"]
    assert inc["disks"]["vda"]["dirty_bytes"] == 65536

    p = fleece("list", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    points = json.loads(p.stdout)["points"]
    assert [pt["id"] for pt in points] == [doc["id"], inc["id"]]
    for pt in points:
        assert set(pt) >= {"id", "vm", "kind", "parent", "created", "disks"}
    assert points[1]["disks"]["vdb"]["dirty_bytes"] == 0
    human = fleece("list", "--repo", repo)
    assert human.returncode == 0 and inc["id"] in human.stdout


def test_bwlimit_caps_what_is_sent(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    vm.write("vda", 0, random_bytes(6 * MiB, 9))  # incompressible: ~6 MiB must go to the repository
    started = time.monotonic()
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(tmp_path / "repo"), "--scratch", str(scratch),
               "--bwlimit", "2M", "--json")
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    sent = json.loads(p.stdout)["uploaded_bytes"]
    assert sent > 6 * MiB
    assert elapsed >= (sent - (512 << 10)) / (2 << 20) * 0.95  # never faster than the limit (minus one burst)


def test_qmp_socket_errors(tmp_path, scratch) -> None:
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--qmp", str(tmp_path / "nope.sock"), "--repo", repo)
    assert p.returncode == 1
    assert "no such socket" in one_line_error(p)

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what a dead VM leaves
    p = fleece("backup", "--qmp", str(stale), "--repo", repo)
    assert p.returncode == 1
    assert "connection refused" in one_line_error(p)

    garbage = tmp_path / "garbage.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(garbage))
    srv.listen(1)

    def talk_nonsense() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"220 hello, I am an SMTP server\r\n")
        time.sleep(2)
        conn.close()

    t = threading.Thread(target=talk_nonsense)
    t.start()
    p = fleece("backup", "--qmp", str(garbage), "--repo", repo)
    t.join()
    srv.close()
    assert p.returncode == 1
    assert "QMP" in one_line_error(p)
    assert not Path(repo).exists() or not list(Path(repo).glob("points/*"))


def test_usage_errors(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--disk", "vdz", "--scratch", str(scratch))
    assert p.returncode == 2
    assert "no disk vdz in this VM; its disks are: vda, vdb" in one_line_error(p)
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--bwlimit", "fast")
    assert p.returncode == 2 and "--bwlimit" in p.stderr
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--workers", "0")
    assert p.returncode == 2
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(tmp_path / "missing"))
    assert p.returncode == 2 and "scratch directory" in one_line_error(p)
    assert fleece_bitmaps(vm.guest) == {"vda": [], "vdb": []}  # nothing was touched
    assert_clean(vm.guest)


def test_raw_disk_is_a_full_without_asking(make_vm, tmp_path, scratch) -> None:
    """A raw image cannot hold a persistent bitmap: it is a full on its own (no --full needed)."""
    vm = make_vm(formats={"vdb": "raw"})
    vm.write("vdb", MiB, random_bytes(65536, 1))
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["disks"]["vdb"]["kind"] == "full"
    r = Repository.open(repo)
    refs = vm.snapshot_refs("now")
    assert_point_matches(r, r.manifest("testvm", doc["id"]), refs)
    assert fleece_bitmaps(vm.guest)["vdb"] == []  # raw images get no bitmap... but qcow2 vda does
    assert len(fleece_bitmaps(vm.guest)["vda"]) == 1


def test_sigkill_mid_run_then_concurrent_then_recovery(make_vm, tmp_path, scratch) -> None:
    vm = make_vm({"vda": 128 * MiB, "vdb": ODD_SIZE})
    vm.write("vdb", 0, random_bytes(MiB, 1))
    repo_path = str(tmp_path / "repo")
    # Small packs: the writer holds only a few MiB, so a slow upload stalls the pull with the fleece live.
    repo = Repository.open(repo_path, create=True, config=RepoConfig(pack_target=MiB))
    first = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch))).manifest
    before = fleece_bitmaps(vm.guest)
    # More than the pipeline buffers (~30 MiB), so the pull is still running, fleece live, when killed.
    vm.write("vda", 8 * MiB, random_bytes(64 * MiB, 2))

    slow = subprocess.Popen([FLEECE, "backup", "--qmp", vm.qmp_path, "--repo", repo_path, "--scratch",
                             str(scratch), "--bwlimit", "256K"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not vm.guest.cmd("query-block-exports"):
            assert slow.poll() is None, slow.stderr.read()
            assert time.monotonic() < deadline, "the backup never exported its fleece"
            time.sleep(0.05)
        time.sleep(1)  # let it read and upload for a while
        vm.write("vdb", 2 * MiB, random_bytes(65536, 3))  # during the killed run

        # A second backup of the same VM while the first runs: refused at once, nothing touched.
        p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo_path, "--scratch", str(scratch), timeout=30)
        assert p.returncode == 1
        assert "already running" in one_line_error(p)
        assert slow.poll() is None
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.wait()

    # What SIGKILL leaves: the export, the filters, a disabled old and an enabled new bitmap.
    assert vm.guest.cmd("query-block-exports")
    assert any(n["node-name"].startswith("fleece-") for n in vm.guest.cmd("query-named-block-nodes", {"flat": True}))
    assert len(fleece_bitmaps(vm.guest)["vda"]) == 2
    assert vm.status() == "running"
    assert repo.point_ids("testvm") == [first.id]

    rec = Recorder(vm)
    result = run_backup(Repository.open(repo_path), BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                                                   on_event=rec))
    assert result.manifest.kind == "incremental" and result.manifest.parent == first.id
    assert_point_matches(repo, result.manifest, rec.refs)
    assert_clean(vm.guest)
    assert [name for name, _ in fleece_bitmaps(vm.guest)["vda"]] == [result.manifest.disks["vda"].bitmap]
    assert result.manifest.disks["vda"].stats["dirty_bytes"] == 64 * MiB
    assert result.manifest.disks["vdb"].stats["dirty_bytes"] == 65536
    assert before != fleece_bitmaps(vm.guest)
    assert not list(Path(scratch).glob("fleece-*")), "scratch files of the killed run were not removed"
