"""Per-disk fulls: ``--full ID``, disks that can never be incremental (raw images, read-only disks).

A raw image has no room for a persistent dirty bitmap, and a read-only node accepts one but loses it at
shutdown ("Lost persistent bitmaps … No write access"): such a disk is backed up without a bitmap, a full
every time, while the VM's qcow2 disks stay incremental in the same points. Each point is restored with
the real ``fleece restore`` and compared with the ground truth (``qemu-img compare``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from checks import assert_clean, fleece, fleece_bitmaps, identical
from conftest import MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository
from test_backup_cli import one_line_error
from vm import TestVM, random_bytes, text_bytes

RAW_SIZE = 8 * MiB + 4608  # odd: the raw disk's last bytes are a partial granule


def backup_cli(vm: TestVM, repo: str, scratch: Path, *extra: str) -> tuple[dict, str]:
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), *extra, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def restored_exactly(repo: str, point: str, refs: dict[str, Path], out: Path) -> None:
    p = fleece("restore", "--repo", repo, "--vm", "testvm", "--point", point, "--out", str(out))
    assert p.returncode == 0, p.stderr
    for disk, ref in refs.items():
        identical(out / f"{disk}.qcow2", ref, "qcow2")


def kinds(doc: dict) -> dict[str, str]:
    return {d: s["kind"] for d, s in doc["disks"].items()}


def test_full_names_disks_and_a_raw_disk_is_always_full(make_vm, tmp_path, scratch) -> None:
    vm = make_vm({"vda": 8 * MiB, "vdb": RAW_SIZE, "vdc": 8 * MiB}, formats={"vdb": "raw"})
    repo = str(tmp_path / "repo")
    for i, d in enumerate(("vda", "vdb", "vdc")):
        vm.write(d, 0, text_bytes(MiB, i))
        vm.write(d, vm.disks[d].size - 512, bytes([i + 1]) * 512)

    # A raw disk no longer needs --full: it gets one by itself, logged once per run.
    first, log = backup_cli(vm, repo, scratch)
    assert kinds(first) == {"vda": "full", "vdb": "full", "vdc": "full"}
    truth = {first["id"]: vm.snapshot_refs("p1")}  # no guest writes run during a backup here

    vm.write("vda", 3 * MiB, random_bytes(65536, 10))
    vm.write("vdb", 4 * MiB, random_bytes(65536, 11))
    vm.write("vdc", 5 * MiB, random_bytes(65536, 12))
    second, log = backup_cli(vm, repo, scratch)
    assert kinds(second) == {"vda": "incremental", "vdb": "full", "vdc": "incremental"}
    assert second["kind"] == "incremental"
    assert log.count("disk vdb: full backup (a raw image cannot hold a persistent dirty bitmap") == 1, log
    assert second["disks"]["vda"]["dirty_bytes"] == 65536  # only the changed granule was read
    truth[second["id"]] = vm.snapshot_refs("p2")
    assert fleece_bitmaps(vm.guest)["vdb"] == []  # the raw disk never gets a bitmap
    assert len(fleece_bitmaps(vm.guest)["vda"]) == 1

    # --full ID: that disk full, the others incremental where they can be.
    vm.write("vda", 6 * MiB, random_bytes(4096, 13))
    vm.write("vdc", 0, b"\x5c" * 4096)
    third, _ = backup_cli(vm, repo, scratch, "--full", "vdc")
    assert kinds(third) == {"vda": "incremental", "vdb": "full", "vdc": "full"}
    truth[third["id"]] = vm.snapshot_refs("p3")

    # --full twice names two disks; a bare --full (here before --json) still means every disk.
    vm.write("vdc", MiB, random_bytes(4096, 14))
    fourth, _ = backup_cli(vm, repo, scratch, "--full", "vda", "--full", "vdb")
    assert kinds(fourth) == {"vda": "full", "vdb": "full", "vdc": "incremental"}
    truth[fourth["id"]] = vm.snapshot_refs("p4")
    fifth, _ = backup_cli(vm, repo, scratch, "--full")
    assert kinds(fifth) == {"vda": "full", "vdb": "full", "vdc": "full"}
    truth[fifth["id"]] = vm.snapshot_refs("p5")

    # A misspelt id is a usage error before anything is frozen: bitmaps and graph untouched.
    before = fleece_bitmaps(vm.guest)
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--full", "vdz")
    assert p.returncode == 2
    assert "no disk vdz in this VM (--full); its disks are: vda, vdb, vdc" in one_line_error(p)
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch),
               "--disk", "vda", "--full", "vdc")
    assert p.returncode == 2 and "--full vdc: this backup leaves that disk out" in one_line_error(p)
    assert fleece_bitmaps(vm.guest) == before
    assert_clean(vm.guest)
    assert Repository.open(repo).point_ids("testvm") == list(truth)

    # Every point, incrementals built on the qcow2 disks' chains and the raw disk's fulls, restores exactly.
    for i, (point, refs) in enumerate(truth.items()):
        restored_exactly(repo, point, refs, tmp_path / f"restore{i}")


def query_block_bitmaps(vm: TestVM) -> dict[str, list[str]]:
    """Dirty bitmaps per disk as ``query-block`` reports them (by device id, or drive name without one)."""
    out = {}
    for b in vm.guest.cmd("query-block"):
        if b.get("inserted"):
            name = b["qdev"].split("/")[3] if b["qdev"].startswith("/machine/peripheral/") else b["device"]
            out[name] = [m["name"] for m in b["inserted"].get("dirty-bitmaps", []) if "name" in m]
    return out


def test_read_only_disks_get_fulls_and_no_bitmap(make_vm, tmp_path, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    # vdc: -blockdev read-only=on on a virtio-blk device; vdd: -drive readonly=on without a device id.
    vm = make_vm({"vda": 8 * MiB, "vdc": 8 * MiB, "vdd": 4 * MiB + 4608}, start=False,
                 node_opts={"vdc": "read-only=on", "vdd": "readonly=on"}, buses={"vdd": "drive-if-none"})
    for i, d in enumerate(("vdc", "vdd")):  # the guest cannot write them: their content comes with the image
        vm.write_image(d, 0, text_bytes(MiB, i))
        vm.write_image(d, vm.disks[d].size - 4608, random_bytes(4608, i))
    vm.start()
    vm.write("vda", 0, random_bytes(MiB, 3))
    repo = Repository.open(str(tmp_path / "repo"), create=True)

    # The default selection (every writable disk) stays as it is: the read-only disks are left out.
    default = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch))).manifest
    assert list(default.disks) == ["vda"]
    assert "skipping read-only device vdc" in caplog.text and "skipping read-only device vdd" in caplog.text

    points = {}
    for n in (1, 2):
        caplog.clear()
        vm.write("vda", n * MiB, random_bytes(65536, 10 + n))
        m = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                           disks=["vda", "vdc", "vdd"])).manifest
        assert {d: r.kind for d, r in m.disks.items()} == {"vda": "incremental", "vdc": "full", "vdd": "full"}
        assert m.disks["vdc"].bitmap is None and m.disks["vdd"].bitmap is None
        for d in ("vdc", "vdd"):
            assert caplog.text.count(f"disk {d}: full backup (read-only: QEMU cannot store a persistent dirty "
                                     "bitmap") == 1, caplog.text
        points[m.id] = vm.snapshot_refs(f"ro{n}")
        assert query_block_bitmaps(vm) == {"vda": [m.disks["vda"].bitmap], "vdc": [], "vdd": []}
        assert_clean(vm.guest)

    for i, (point, refs) in enumerate(points.items()):
        restored_exactly(repo.url, point, refs, tmp_path / f"restore{i}")

    # A persistent bitmap on a read-only node would be lost here, with QEMU complaining in its log.
    vm.quit()
    assert "Lost persistent bitmaps" not in (vm.dir / "qemu.log").read_text()
