"""``fleece live-restore``: a new QEMU starts on local images backed by the served point, writes while
QEMU's stream copies the rest home, and ends with images equal to the point plus those writes — with no
backing file left. A stream that cannot read the repository pauses, is resumed, and is finally cancelled
with the image intact.

The new QEMU here has no guest OS (test_guest_boot.py boots a real one): its writes are ``qemu-io`` on the
device through a second monitor, at moments the test picks while the stream is slowed down (``--speed``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from checks import FLEECE, fleece, ok, qemu_img
from conftest import MiB
from fleece.exporter.qmp import Monitor
from fleece.repository import Repository
from fleece.repository.pack import pack_name
from fleece.restore.reader import PointReader
from vm import QEMU, TestVM, random_bytes, text_bytes

SIZE = 24 * MiB


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory):
    """A full and an incremental of a one-disk VM; the truth of the incremental."""
    d = tmp_path_factory.mktemp("live")
    vm = TestVM(d / "vm", {"vda": SIZE}, name="livevm")
    vm.start()
    try:
        scratch = d / "scratch"
        scratch.mkdir()
        repo = str(d / "repo")
        vm.write("vda", 0, text_bytes(2 * MiB, 1))
        vm.write("vda", 6 * MiB, random_bytes(8 * MiB, 2))
        vm.write("vda", SIZE - 65536, random_bytes(65536, 3))
        ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json"))
        vm.write("vda", 7 * MiB, random_bytes(MiB, 4))
        vm.zero("vda", 10 * MiB, MiB)
        inc = ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json"))
        refs = vm.snapshot_refs("inc")
    finally:
        vm.quit()
    return {"repo": repo, "id": inc["id"], "ref": refs["vda"]}


class NewQemu:
    """The VM a user starts with live-restore's arguments (plus a monitor of the test's own)."""

    def __init__(self, workdir: Path, ready: dict) -> None:
        self.test_qmp = workdir / "test-qmp.sock"
        args = [QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", *ready["qemu_args"],
                "-device", ready["devices"]["vda"], "-qmp", f"unix:{self.test_qmp},server=on,wait=off"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.test_qmp.exists():
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.mon = Monitor(str(self.test_qmp))

    def write(self, offset: int, data_pattern: int, length: int) -> None:
        # qemu-io on the device's QOM path (FIELD-NOTES §12.1): a guest write into the new image
        self.mon.hmp(f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -q -P {data_pattern} {offset} {length}"')

    def job(self) -> dict | None:
        return next((j for j in self.mon.cmd("query-jobs") if j["id"] == "fleece-live-vda"), None)

    def stop(self) -> None:
        try:
            self.mon.close()
        finally:
            self.proc.kill()
            self.proc.wait()


def start_live(point: dict, out: Path, *extra: str, repo: str | None = None) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([FLEECE, "live-restore", "--repo", repo or point["repo"], "--vm", "livevm", "--out",
                             str(out), "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    ready = json.loads(line)
    assert ready["stage"] == "ready" and ready["point"] == point["id"]
    return proc, ready


def test_live_restore_with_writes_during_the_stream(point, tmp_path) -> None:
    out = tmp_path / "out"
    proc, ready = start_live(point, out, "--speed", "4")  # 4 MB/s: the stream takes seconds, writes land in it
    image = Path(ready["images"]["vda"])
    assert image.stat().st_mode & 0o077 == 0 and out.stat().st_mode & 0o077 == 0
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)).stdout)
    assert info["backing-filename"].startswith("nbd+unix:///vda?socket="), info  # nothing copied first
    qemu = NewQemu(tmp_path, ready)
    try:
        deadline = time.monotonic() + 30
        while (job := qemu.job()) is None or job["current-progress"] == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        assert job["current-progress"] < job["total-progress"], "the stream ended before the test could write"
        expected = bytearray(point["ref"].read_bytes())
        # writes ahead of the stream (not copied yet), over data and over the zeroed MiB, and at the start
        for off, pattern, n in [(SIZE - 2 * MiB, 0x71, 65536), (10 * MiB + 4096, 0x72, 8192), (0, 0x73, 4096)]:
            qemu.write(off, pattern, n)
            expected[off:off + n] = bytes([pattern]) * n
        assert proc.wait(120) == 0, proc.stderr.read()
        done = json.loads(proc.stdout.readline())
        assert done["stage"] == "done" and done["stream_s"] > 0
        again = fleece("live-restore", "--repo", point["repo"], "--vm", "livevm", "--out", str(out), "--force")
        assert again.returncode == 2 and "is in use" in again.stderr, "--force replaced the image a VM runs on"
        # the VM runs on its own images: still writable, no backing, and the server is gone
        qemu.write(3 * MiB, 0x74, 4096)
        expected[3 * MiB:3 * MiB + 4096] = b"\x74" * 4096
        nodes = {n["node-name"]: n for n in qemu.mon.cmd("query-named-block-nodes", {"flat": True})}
        assert not nodes["fleece-live-vda"].get("backing_file")
        assert not list(Path("/tmp").glob(f"fleece-serve-{proc.pid}-*")), "the server's run directory (its socket) is left"
        qemu.mon.cmd("quit")
        qemu.proc.wait(30)
    finally:
        qemu.stop()
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert "backing-filename" not in info
    truth = tmp_path / "expected.raw"
    truth.write_bytes(expected)
    cmp = qemu_img("compare", "-F", "raw", str(image), str(truth))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_a_stream_that_cannot_read_is_cancelled_and_the_image_stays_intact(point, tmp_path) -> None:
    repo_dir = tmp_path / "repo"
    shutil.copytree(point["repo"], repo_dir)
    with Repository.open(str(repo_dir)) as repo:
        r = PointReader(repo, repo.manifest("livevm", point["id"]), "vda")
        victim = next(p for p in r.pieces if p.blob is not None and p.offset >= 12 * MiB)
        loc = r._where[victim.blob]
    with open(repo_dir / pack_name(loc.pack), "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        b = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([b[0] ^ 0x01]))
    out = tmp_path / "out"
    proc, ready = start_live(point, out, "--stream-retries", "1", repo=str(repo_dir))
    qemu = NewQemu(tmp_path, ready)
    try:
        failed = json.loads(proc.stdout.readline() or "{}")  # said at once; the server keeps serving the VM
        assert failed.get("stage") == "failed" and "the stream stopped" in failed["error"], failed
        assert proc.poll() is None, "the server stopped under a VM still reading from it"
        assert qemu.job() is None, "the cancelled job is left behind in QEMU"
        nodes = {n["node-name"]: n for n in qemu.mon.cmd("query-named-block-nodes", {"flat": True})}
        assert nodes["fleece-live-vda"].get("backing_file"), "the image lost its backing though not all was copied"
        proc.send_signal(signal.SIGTERM)  # the user stops it
        code = proc.wait(60)
        err = proc.stderr.read()
        assert code == 1, err
        errors = [ln for ln in err.splitlines() if ln.startswith("fleece: error:")]
        assert len(errors) == 1 and "the stream stopped" in errors[0] and "intact" in errors[0], err
        assert loc.pack in err, "the server's log names the damaged pack"
        qemu.mon.cmd("quit")  # a clean close writes qcow2's cached metadata (a kill would lose the copied clusters)
        qemu.proc.wait(30)
    finally:
        qemu.stop()
    # nothing of the damaged blob's range was written into the image: it still reads through the backing
    image = Path(ready["images"]["vda"])
    alone = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(image)}})
    m = qemu_img("map", "--output=json", "-U", f"json:{alone}")  # the image's own clusters (the server is gone)
    assert m.returncode == 0, m.stderr
    mapped = json.loads(m.stdout)
    assert any(e["data"] for e in mapped), f"the stream copied nothing before it stopped: {mapped}"
    for m in mapped:
        if m["data"]:
            assert m["start"] + m["length"] <= victim.offset or m["start"] >= victim.offset + victim.length, m


def test_nothing_is_left_when_no_qemu_comes(point, tmp_path) -> None:
    out = tmp_path / "out"
    p = fleece("live-restore", "--repo", point["repo"], "--vm", "livevm", "--out", str(out), "--qmp-timeout", "1")
    assert p.returncode == 1 and "no QEMU answered" in p.stderr, p.stderr
    assert not list(out.glob("*.qcow2")), "images no QEMU ever used are removed"
    p = fleece("live-restore", "--repo", point["repo"], "--vm", "livevm", "--out", str(out), "--point", "nosuch")
    assert p.returncode == 1 and "has no point" in p.stderr


def test_a_qemu_started_with_S_gets_the_disks_and_runs(point, tmp_path) -> None:
    qmp = tmp_path / "vm-qmp.sock"
    test_qmp = tmp_path / "t.sock"
    qemu = subprocess.Popen([QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                             "-device", "pcie-root-port,id=rp0,chassis=1",  # q35: a slot a device may be added to
                             "-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{test_qmp},server=on,wait=off"])
    try:
        out = tmp_path / "out"
        p = fleece("live-restore", "--repo", point["repo"], "--vm", "livevm", "--out", str(out), "--qmp", str(qmp),
                   "--device", "virtio-blk-pci,bus=rp0", "--json")
        assert p.returncode == 0, p.stderr
        ready, done = (json.loads(ln) for ln in p.stdout.splitlines())
        assert "-qmp" not in ready["qemu_args"] and done["stage"] == "done"
        with Monitor(str(test_qmp)) as mon:
            assert mon.cmd("query-status")["status"] == "running"
            devices = {b.get("qdev", "") for b in mon.cmd("query-block")}
            assert any("/machine/peripheral/vda" in q for q in devices), devices
            mon.cmd("quit")
        qemu.wait(30)
        cmp = qemu_img("compare", "-F", "raw", ready["images"]["vda"], str(point["ref"]))
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def test_a_running_qemu_without_the_images_is_left_alone(point, tmp_path) -> None:
    qmp = tmp_path / "vm-qmp.sock"
    qemu = subprocess.Popen([QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{qmp},server=on,wait=off"])
    try:
        p = fleece("live-restore", "--repo", point["repo"], "--vm", "livevm", "--out", str(tmp_path / "o"),
                   "--qmp", str(qmp))
        assert p.returncode == 1 and "with -S" in p.stderr, p.stderr
    finally:
        qemu.kill()
        qemu.wait()


def test_a_qemu_on_other_images_is_not_streamed_into(point, tmp_path) -> None:
    out = tmp_path / "out"
    proc, ready = start_live(point, out, "--qmp-timeout", "60")
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-f", "qcow2", str(other), str(SIZE))
    args = [a.replace(ready["images"]["vda"], str(other)) for a in ready["qemu_args"]]  # the node name, not the image
    qemu = subprocess.Popen([QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", *args])
    try:
        code = proc.wait(60)
        err = proc.stderr.read()
        assert code == 1 and "not backed by" not in err and "was started with other images" in err, err
        assert json.loads(qemu_img("info", "-U", "--output=json", str(other)).stdout).get("backing-filename") is None
    finally:
        qemu.kill()
        qemu.wait()
