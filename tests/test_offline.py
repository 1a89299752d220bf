"""Shut-off VMs: ``fleece backup --image`` opens the images in qemu-storage-daemon (real QEMU, real NBD).

A VM backed up running, then off, then running again stays incremental throughout (the same persistent
bitmaps travel in the qcow2); an image another process holds is refused with nothing touched; a killed run
leaves the image unlocked and the next run exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from checks import FLEECE, assert_point_matches, fleece, fleece_bitmaps, interrupted_while_starting
from conftest import ODD_SIZE, MiB
from fleece.exporter.storage_daemon import StorageDaemon
from fleece.repository import RepoConfig, Repository
from test_backup import seed
from test_backup_cli import one_line_error
from vm import random_bytes, sha256_file


def qsd_processes(scratch: Path) -> list[int]:
    """qemu-storage-daemon processes of runs under *scratch* (zombies count as gone)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cmdline and cmdline[0].endswith(b"qemu-storage-daemon") and \
                any(str(scratch).encode() in part for part in cmdline):
            found.append(int(pid))
    return found


def write_lock_free(image: Path) -> bool:
    """Whether a process may open *image* for writing now (qemu-io takes QEMU's image locks)."""
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -q 0 512", str(image)], capture_output=True, text=True)
    return p.returncode == 0 and "lock" not in p.stderr


def backup_json(*args: str) -> dict:
    p = fleece("backup", *args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_running_then_shut_off_then_running_stays_incremental(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    seed(vm)
    repo_path = str(tmp_path / "repo")
    common = ("--repo", repo_path, "--scratch", str(scratch))
    full = backup_json("--qmp", vm.qmp_path, *common)
    assert full["kind"] == "full"

    vm.write("vda", 3 * MiB, random_bytes(65536, 11))
    vm.zero("vdb", 5 * MiB, MiB)  # data at the full, zeros now
    vm.quit()  # the VM is shut off: QEMU stores the bitmaps in the qcow2s
    refs = vm.snapshot_refs("off")
    images = [str(vm.disks[d].image) for d in ("vda", "vdb")]

    # No --vm, no ids: the history says these files are vda and vdb of testvm.
    off = backup_json(*[a for i in images for a in ("--image", i)], *common)
    assert off["vm"] == "testvm" and off["kind"] == "incremental" and off["parent"] == full["id"]
    assert off["disks"]["vda"]["dirty_bytes"] == 65536
    assert off["disks"]["vdb"]["dirty_bytes"] == MiB
    assert off["disks"]["vdb"]["zero_bytes"] >= MiB  # the zeroed MiB is recorded as zeros, nothing read for it
    repo = Repository.open(repo_path)
    manifest = repo.manifest("testvm", off["id"])
    assert manifest.extra["vm_state"] == "shut off"
    assert_point_matches(repo, manifest, refs)
    assert not qsd_processes(scratch), "the storage daemon outlived the backup"
    assert all(write_lock_free(Path(i)) for i in images), "the backup left an image locked"
    assert not list(scratch.iterdir()), "the run left files in the scratch directory"

    # Started again: the bitmaps the storage daemon kept carry on; the next running backup is incremental.
    vm.start()
    vm.write("vdb", 9 * MiB, random_bytes(65536, 12))
    on = backup_json("--qmp", vm.qmp_path, *common)
    assert on["kind"] == "incremental" and on["parent"] == off["id"]
    assert on["disks"]["vdb"]["dirty_bytes"] == 65536 and on["disks"]["vda"]["dirty_bytes"] == 0
    assert_point_matches(Repository.open(repo_path), Repository.open(repo_path).manifest("testvm", on["id"]),
                         vm.snapshot_refs("on"))
    assert [n for n, _ in fleece_bitmaps(vm.guest)["vdb"]] == [
        Repository.open(repo_path).manifest("testvm", on["id"]).disks["vdb"].bitmap]


def test_image_held_by_a_running_vm_is_refused(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    seed(vm)
    repo_path = str(tmp_path / "repo")
    backup_json("--qmp", vm.qmp_path, "--repo", repo_path, "--scratch", str(scratch))
    vm.write("vda", 0, b"\x42" * 4096)
    image = vm.disks["vda"].image
    before_file, before_bitmaps = sha256_file(image), fleece_bitmaps(vm.guest)
    p = fleece("backup", "--image", str(image), "--repo", repo_path, "--scratch", str(scratch), "--vm", "testvm")
    assert p.returncode == 1
    line = one_line_error(p)
    assert "in use by another process" in line and str(image) in line and "--qmp" in line
    assert Repository.open(repo_path).point_ids("testvm").__len__() == 1  # no new point
    assert sha256_file(image) == before_file  # the image file is byte for byte what it was
    assert fleece_bitmaps(vm.guest) == before_bitmaps
    assert vm.status() == "running"
    assert not qsd_processes(scratch) and not list(scratch.iterdir())
    p = fleece("backup", "--image", str(image), "--repo", repo_path, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["error"]["kind"] == "image-in-use"


def test_killed_offline_backup_leaves_image_unlocked_and_next_run_exact(make_vm, tmp_path, scratch) -> None:
    vm = make_vm({"vda": 128 * MiB}, start=False)  # a VM that never runs here: its image only
    vm.write_image("vda", 0, random_bytes(MiB, 1))
    image = vm.disks["vda"].image
    repo_path = str(tmp_path / "repo")
    Repository.open(repo_path, create=True, config=RepoConfig(pack_target=MiB))  # small packs: slow upload stalls
    common = ("--image", f"vda={image}", "--vm", "offvm", "--repo", repo_path, "--scratch", str(scratch))
    first = backup_json(*common)
    assert first["kind"] == "full" and set(first["disks"]) == {"vda"}
    vm.write_image("vda", 8 * MiB, random_bytes(64 * MiB, 2))  # qemu-io records it in the image's bitmap

    slow = subprocess.Popen([FLEECE, "backup", *common, "--bwlimit", "256K"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not list(scratch.glob("fleece-run-*")):
            assert slow.poll() is None, slow.stderr.read()
            assert time.monotonic() < deadline, "the backup never started its pull"
            time.sleep(0.05)
        time.sleep(1.5)  # reading and uploading
        assert slow.poll() is None
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.wait()
    deadline = time.monotonic() + 15
    while qsd_processes(scratch):  # SIGTERM from the parent-death signal: it closes the image and exits
        assert time.monotonic() < deadline, "qemu-storage-daemon outlived the killed backup"
        time.sleep(0.1)
    assert write_lock_free(image)
    assert Repository.open(repo_path).point_ids("offvm") == [first["id"]]

    vm.write_image("vda", 100 * MiB, random_bytes(65536, 3))  # after the killed run, before the next
    refs = vm.snapshot_refs("truth")
    nxt = backup_json(*common)
    assert nxt["kind"] == "incremental" and nxt["parent"] == first["id"]
    assert nxt["disks"]["vda"]["dirty_bytes"] == 64 * MiB + 65536  # the killed run's bitmap folded back
    repo = Repository.open(repo_path)
    assert_point_matches(repo, repo.manifest("offvm", nxt["id"]), refs)
    assert not list(scratch.iterdir())


def test_raw_image_is_a_full_every_time(make_vm, tmp_path, scratch) -> None:
    vm = make_vm({"disk0": ODD_SIZE}, formats={"disk0": "raw"}, start=False)
    vm.write_image("disk0", MiB, random_bytes(2 * MiB, 4))
    common = ("--image", str(vm.disks["disk0"].image), "--repo", str(tmp_path / "repo"), "--scratch", str(scratch))
    first = backup_json(*common)
    assert first["vm"] == "disk0" and set(first["disks"]) == {"disk0"}  # named after the file
    vm.write_image("disk0", 0, b"\x01" * 4096)
    second = backup_json(*common)
    assert second["kind"] == "full" and second["vm"] == "disk0"
    assert second["new_blobs"] <= 2  # the unchanged data dedups against the first full
    repo = Repository.open(str(tmp_path / "repo"))
    assert_point_matches(repo, repo.manifest("disk0", second["id"]), vm.snapshot_refs("now"))

    # the guest writes a qcow2 header into its raw disk, backed by a host file it wants to read
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(evil),
                    str(ODD_SIZE)], check=True)
    vm.write_image("disk0", 0, evil.read_bytes()[:65536])
    p = fleece("backup", *common)
    assert p.returncode == 2 and "recorded disk disk0 as a raw image" in one_line_error(p), p.stderr
    assert "--image-format raw" in p.stderr
    assert Repository.open(str(tmp_path / "repo")).point_ids("disk0") == [first["id"], second["id"]]
    third = backup_json(*common, "--image-format", "raw")  # read as what it is: the guest's bytes
    assert third["kind"] == "full"
    assert_point_matches(repo, Repository.open(str(tmp_path / "repo")).manifest("disk0", third["id"]),
                         vm.snapshot_refs("evil"))


def test_bad_image_arguments(tmp_path, scratch) -> None:
    repo = str(tmp_path / "repo")
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    (tmp_path / "notes.txt").write_text("not an image")
    sock = str(tmp_path / "qmp.sock")
    cases = [
        (["--image", str(tmp_path / "missing.qcow2")], "no such file"),
        (["--image", str(tmp_path)], "is a directory"),
        (["--image", str(img), "--image", f"x={img}"], "given twice"),
        (["--image", f"a={img}", "--image", f"a={tmp_path / 'notes.txt'}"], "given to two images"),
        (["--image", str(img), "--qmp", sock], "exclude each other"),
        ([], "--qmp SOCK for a running one"),
        (["--qmp", sock, "--image-format", "raw"], "--image-format only goes with --image"),
        (["--qmp", sock, "--qga", sock], "add --quiesce"),
        (["--image", str(img), "--quiesce"], "a shut-off VM (--image) has none mounted"),
        (["--qmp", sock, "--quiesce"], "--quiesce needs --qga SOCK"),
    ]
    for args, text in cases:
        p = fleece("backup", *args, "--repo", repo, "--scratch", str(scratch))
        assert p.returncode == 2, (args, p.stderr)
        assert text in one_line_error(p), (args, p.stderr)
    assert not Path(repo).exists()  # a failed first backup leaves no repository


def test_an_interruption_while_the_daemon_starts_stops_it(tmp_path, monkeypatch) -> None:
    """Ctrl-C/SIGTERM while qemu-storage-daemon starts: ``with StorageDaemon`` never reaches ``__exit__``,
    so the start itself must end the daemon and remove its run directory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def start() -> None:
        with StorageDaemon([], scratch):
            raise AssertionError("the fake daemon never listens")

    interrupted_while_starting(tmp_path, monkeypatch, "qemu-storage-daemon", start)
    assert not list(scratch.iterdir())
