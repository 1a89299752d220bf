"""Bitmap trust-but-verify: writes the dirty bitmap never saw are caught by the audit sample, and the disk
becomes a verified full — against a real QEMU, with the image changed behind its back."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from checks import assert_clean, assert_point_matches
from conftest import MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository
from test_backup import Recorder
from vm import TestVM, random_bytes, text_bytes


def write_behind_qemus_back(vm: TestVM, disk_id: str, offset: int, data: bytes) -> None:
    """With QEMU shut down, write the image while its persistent bitmaps are not recording (a repair
    tool, a host-side copy): QEMU's bitmaps stay "clean" for these bytes."""
    disk = vm.disks[disk_id]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk.image)], check=True,
                                     capture_output=True, text=True).stdout)
    names = [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]
    for n in names:
        subprocess.run(["qemu-img", "bitmap", "--disable", str(disk.image), n], check=True)
    src = vm.dir / "behind.bin"
    src.write_bytes(data)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {src} {offset} {len(data)}", str(disk.image)],
                   check=True)
    for n in names:
        subprocess.run(["qemu-img", "bitmap", "--enable", str(disk.image), n], check=True)
    with open(disk.reference, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _backup(vm: TestVM, repo: Repository, scratch: Path, **kw):
    rec = Recorder(vm)
    result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec, **kw))
    return result, rec


@pytest.fixture
def setup(make_vm, tmp_path: Path, scratch: Path):
    vm = make_vm(disks={"vda": 16 * MiB, "vdb": 8 * MiB})
    for i in range(4):
        vm.write("vda", i * 4 * MiB, text_bytes(3 * MiB, i))
    vm.write("vdb", 0, random_bytes(2 * MiB, 9))
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    full, _ = _backup(vm, repo, scratch)
    vm.write("vda", 5 * MiB, random_bytes(65536, 10))
    inc, rec = _backup(vm, repo, scratch)
    assert inc.manifest.kind == "incremental"
    assert inc.manifest.disks["vda"].stats["audit"]["mismatch_count"] == 0
    assert_point_matches(repo, inc.manifest, rec.refs)
    vm.quit()
    return vm, repo


def test_audit_catches_writes_the_bitmap_missed(setup, scratch, caplog) -> None:
    caplog.set_level(logging.INFO)
    vm, repo = setup
    write_behind_qemus_back(vm, "vda", 8 * MiB + 4096, b"\xbe" * 8192)  # inside a clean blob
    write_behind_qemus_back(vm, "vdb", 6 * MiB, b"\xef" * 4096)  # where the last point holds zeros
    vm.start()
    vm.write("vda", 12 * MiB, b"\x01" * 65536)  # an ordinary, tracked write too
    result, rec = _backup(vm, repo, scratch, audit_sample=64)  # a sample that covers this small disk
    vda, vdb = result.manifest.disks["vda"], result.manifest.disks["vdb"]
    assert vda.kind == "full" and vdb.kind == "full", (vda.stats, vdb.stats)
    assert "verified full: the dirty bitmap missed writes" in vda.stats["reason"]
    assert vda.stats["audit"]["mismatch_count"] >= 1 and "differs" in vda.stats["audit"]["mismatches"][0]["what"]
    assert "zero in the parent point" in vdb.stats["audit"]["mismatches"][0]["what"]
    assert "the dirty bitmap missed writes" in caplog.text
    assert_point_matches(repo, result.manifest, rec.refs)  # the point holds the behind-the-back bytes
    assert_clean(vm.guest)
    # Dedup: the verified full uploads only what the repository lacks (a few changed blobs, not the disk).
    # vda's cells at 4, 8 and 12 MiB and vdb's at 4 MiB changed; vda's and vdb's first cells dedup.
    assert (result.stats["writer"]["new_blobs"], result.stats["writer"]["dedup_blobs"]) == (4, 2)
    # And the chain goes on incrementally from the verified full.
    vm.write("vda", 0, b"\x02" * 4096)
    nxt, rec = _backup(vm, repo, scratch)
    assert nxt.manifest.kind == "incremental"
    assert_point_matches(repo, nxt.manifest, rec.refs)


def test_without_the_audit_the_miss_goes_unnoticed(setup, scratch) -> None:
    """The control: the audit, and nothing else, is what catches it."""
    vm, repo = setup
    write_behind_qemus_back(vm, "vda", 8 * MiB + 4096, b"\xbe" * 8192)
    vm.start()
    result, rec = _backup(vm, repo, scratch, audit_sample=0)
    assert result.manifest.disks["vda"].kind == "incremental"
    assert "audit" not in result.manifest.disks["vda"].stats
    with pytest.raises(AssertionError, match="differs from the truth"):
        assert_point_matches(repo, result.manifest, rec.refs)


def test_a_disk_shrunk_and_grown_back_is_caught(make_vm, tmp_path: Path, scratch: Path) -> None:
    """QEMU truncates a bitmap on shrink and regrows it clean: the regrown tail reads zero while the
    bitmap calls it unchanged. The audit's tail check catches it whatever the sample size."""
    vm = make_vm(disks={"vda": 64 * MiB})
    vm.write("vda", 0, text_bytes(MiB, 1))
    vm.write("vda", 40 * MiB, random_bytes(3 * MiB, 2))  # above the shrink point
    vm.write("vda", 60 * MiB, text_bytes(2 * MiB, 3))
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    _backup(vm, repo, scratch)
    vm.resize("vda", 32 * MiB)
    vm.resize("vda", 64 * MiB)  # same size as recorded: the level choice sees nothing
    result, rec = _backup(vm, repo, scratch, audit_sample=1)
    vda = result.manifest.disks["vda"]
    assert vda.kind == "full" and "verified full" in vda.stats["reason"], vda.stats
    assert_point_matches(repo, result.manifest, rec.refs)


def test_shrunk_and_grown_back_with_a_write_in_the_same_blob_is_caught(make_vm, tmp_path: Path, scratch: Path) -> None:
    """The regrown range's only blob also holds a new guest write: its clean parts are still checked."""
    vm = make_vm(disks={"vda": 8 * MiB})
    vm.write("vda", 0, text_bytes(4 * MiB, 4))
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    _backup(vm, repo, scratch)
    vm.resize("vda", 2 * MiB)
    vm.resize("vda", 8 * MiB)
    vm.write("vda", 3 * MiB, b"\x07" * 65536)  # dirty, inside the one 4 MiB blob the regrow broke
    result, rec = _backup(vm, repo, scratch)
    vda = result.manifest.disks["vda"]
    assert vda.kind == "full" and "verified full" in vda.stats["reason"], vda.stats
    assert_point_matches(repo, result.manifest, rec.refs)
