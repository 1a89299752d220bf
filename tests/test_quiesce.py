"""``backup --quiesce``: application-consistent points through a real qemu-guest-agent in a real guest.

The guest (tests/guest.py: Debian's kernel, busybox, ext4 root on /dev/vda) runs Debian's qemu-ga on a
virtio-serial port and keeps writing. Its fsfreeze hook (``qemu-ga -F``) writes a fresh token into
``/data/hooked`` and prints it, the way a database checkpoints before a freeze. A quiesced point must:

* say ``consistency: quiesced`` in the manifest and the ``--json`` summary;
* hold the token the hook wrote for *this* point (the freeze came before the point in time);
* restore to a filesystem ``e2fsck -fn`` finds clean (ext4's freeze leaves no journal to replay);
* leave the guest thawed and writing again — also when the run is SIGKILLed while the guest is frozen
  (the thaw guard), and when it is killed while the guest is frozen *and* paused (the next run resumes
  the guest, then the guard's thaw gets through).

Without an agent (no socket) the point is crash-consistent and says why; the run does not fail. The
freeze's exact bracketing and the failure paths are test_agent.py's (a fake agent); here a fake also
shows the freeze spans exactly the pause, and that a quiesced point of a TestVM is bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import guest
from checks import FLEECE, assert_point_matches, fleece, ok
from fake_agent import FakeAgent
from fleece.exporter.agent import GuestAgent
from fleece.exporter.qmp import Monitor
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository
from vm import TestVM

MiB = 1 << 20

INIT = r"""#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo FLEECE-GUEST-UP
""" + guest.AGENT_START + r"""
n=0
while :; do  # 64 KiB every ~0.1 s over the first 4 MiB of /data/churn: the guest never stops writing
  dd if=/dev/urandom of=/data/churn bs=65536 count=1 seek=$((n % 64)) conv=notrunc 2>/dev/null
  n=$((n + 1))
  [ $((n % 4)) -eq 0 ] && sync && echo "FLEECE-CHURN $n"
  sleep 0.1
done
"""

# qemu-ga runs the hook with "freeze" before it freezes and "thaw" after it thaws
HOOK = r"""#!/bin/sh
if [ "$1" = freeze ]; then
  t=$(cat /proc/sys/kernel/random/uuid)
  echo "$t" >/data/hooked
  sync
  echo "FLEECE-HOOK freeze $t" >/dev/console
else
  echo "FLEECE-HOOK $1" >/dev/console
fi
exit 0
"""


@pytest.fixture(scope="module")
def agent_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("qguest")
    root = guest.make_rootfs(d / "root.qcow2", INIT, size_mib=48, agent=True,
                             files={"/etc/fleece-hook": HOOK}, modes={"/etc/fleece-hook": 0o755})
    g = guest.Guest(d / "g", ["-drive", f"file={root},format=qcow2,if=none,id=d0,node-name=root0",
                              "-device", "virtio-blk-pci,drive=d0,id=vda"], agent=True)
    try:
        g.wait_for("FLEECE-AGENT-UP", timeout=120)
        wait_thawed(g, 60)  # the agent answers
        g.wait_for("FLEECE-CHURN 8", timeout=60)
        yield g
    finally:
        g.stop()


def agent_status(g: guest.Guest, timeout: float = 3) -> str:
    a = GuestAgent(g.qga_path, timeout)
    try:
        a.sync()
        return a.call("guest-fsfreeze-status", "status")
    finally:
        a.close()


def wait_thawed(g: guest.Guest, within: float) -> None:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            last = agent_status(g)
            if last == "thawed":
                return
        except Exception as e:  # noqa: BLE001 - not answering yet (or the guard holds the channel)
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"the guest is not thawed within {within} s: {last}")


def churn(g: guest.Guest) -> int:
    return max(int(n) for n in re.findall(r"FLEECE-CHURN (\d+)", g.console()))


def still_writing(g: guest.Guest) -> None:
    before = churn(g)
    g.wait_for(f"FLEECE-CHURN {before + 8}", timeout=60)


def backup(g: guest.Guest, repo: str, scratch: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return fleece("backup", "--qmp", g.qmp_path, "--vm", "qguest", "--repo", repo, "--scratch", str(scratch),
                  "--json", *extra)


def restored_fs(repo: str, point: str, out: Path) -> Path:
    ok(fleece("restore", "--repo", repo, "--vm", "qguest", "--point", point, "--out", str(out), "--flat",
              "--format", "raw", "--json"))
    [image] = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return image


def e2fsck_clean(image: Path) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, f"e2fsck -fn: exit {r.returncode}\n{r.stdout}{r.stderr}"


def hook_tokens(g: guest.Guest) -> list[str]:
    return re.findall(r"FLEECE-HOOK freeze (\S+)", g.console())


def test_quiesced_full_and_incremental_of_a_real_guest(agent_guest, tmp_path) -> None:
    g = agent_guest
    repo, scratch = str(tmp_path / "repo"), tmp_path / "scratch"
    scratch.mkdir()
    for n, kind in enumerate(["full", "incremental"]):
        tokens = len(hook_tokens(g))
        p = backup(g, repo, scratch, "--quiesce", "--qga", g.qga_path)
        doc = ok(p)
        assert doc["kind"] == kind and doc["consistency"] == "quiesced", doc
        q = doc["quiesce"]
        assert q["filesystems"] >= 1 and q["thawed"] is True and q["freeze_ms"] > 0 and q["frozen_ms"] > 0, q
        assert "filesystems quiesced" not in p.stdout  # --json: the document only
        m = Repository.open(repo).manifest("qguest", doc["id"])
        assert m.consistency == "quiesced" and m.extra["quiesce"]["filesystems"] == q["filesystems"]

        new = hook_tokens(g)[tokens:]
        assert len(new) == 1, f"the hook ran {len(new)} times for one backup"
        image = restored_fs(repo, doc["id"], tmp_path / f"r{n}")
        assert guest.read_file(image, "/data/hooked", fmt="raw").decode().strip() == new[0], \
            "the point does not hold what the freeze hook wrote: the freeze did not precede the point"
        e2fsck_clean(image)
        assert agent_status(g) == "thawed"
        still_writing(g)


def test_no_agent_socket_gives_a_crash_point_that_says_why(agent_guest, tmp_path) -> None:
    g = agent_guest
    repo, scratch = str(tmp_path / "repo"), tmp_path / "scratch"
    scratch.mkdir()
    p = backup(g, repo, scratch, "--quiesce", "--qga", str(tmp_path / "no-such.sock"))
    doc = ok(p)
    assert doc["consistency"] == "crash"
    assert "cannot reach the guest agent" in doc["quiesce"]["reason"], doc
    assert "crash-consistent" in p.stderr
    human = fleece("backup", "--qmp", g.qmp_path, "--vm", "qguest", "--repo", repo, "--scratch", str(scratch),
                   "--quiesce", "--qga", str(tmp_path / "no-such.sock"))
    assert human.returncode == 0 and "crash-consistent (cannot reach the guest agent" in human.stdout, human.stdout
    human = fleece("backup", "--qmp", g.qmp_path, "--vm", "qguest", "--repo", repo, "--scratch", str(scratch),
                   "--quiesce", "--qga", g.qga_path)
    assert human.returncode == 0 and "filesystems quiesced" in human.stdout, human.stdout
    assert len(ok(fleece("list", "--repo", repo, "--vm", "qguest", "--json"))["points"]) == 3


KILLER = """
import os, signal, sys
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository

repo, qmp, qga, scratch, moment = sys.argv[1:]

def on_event(name, data):
    if name == moment:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no thaw: what an OOM kill leaves

run_backup(Repository.open(repo, create=True), BackupRequest(qmp=qmp, vm="qguest", scratch=scratch, quiesce=True,
                                                             qga=qga, on_event=on_event))
"""


@pytest.mark.parametrize("moment", ["quiesced", "freezing"])
def test_run_killed_while_the_guest_is_frozen(agent_guest, tmp_path, moment) -> None:
    """SIGKILL with the guest frozen ("quiesced"), or frozen and paused ("freezing"): the guard resumes a
    guest paused under the dead run's marker (its agent cannot answer before) and thaws it, on its own;
    the guest writes again, and the next quiesced backup works."""
    g = agent_guest
    repo, scratch = str(tmp_path / "repo"), tmp_path / "scratch"
    scratch.mkdir()
    p = subprocess.run([str(Path(FLEECE).parent / "python"), "-c", KILLER, repo, g.qmp_path, g.qga_path,
                        str(scratch), moment], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    wait_thawed(g, 60)  # the guard, on its own
    mon = Monitor(g.qmp_path, timeout=10, connect_timeout=30)  # free again once the guard let go of it
    try:
        assert mon.cmd("query-status")["status"] == "running"
    finally:
        mon.close()
    still_writing(g)
    doc = ok(backup(g, repo, scratch, "--quiesce", "--qga", g.qga_path))
    assert doc["kind"] == "full"  # the killed run committed nothing
    if doc["consistency"] != "quiesced":  # the guard may still have held the agent's channel
        assert "did not answer" in doc["quiesce"]["reason"], doc
        doc = ok(backup(g, repo, scratch, "--quiesce", "--qga", g.qga_path))
        assert doc["consistency"] == "quiesced", doc
    e2fsck_clean(restored_fs(repo, doc["id"], tmp_path / "r"))


def test_the_freeze_spans_exactly_the_pause_and_the_point_is_exact(tmp_path) -> None:
    """A TestVM (qemu-io writes, reference images) with a fake agent: the guest is frozen when it is
    paused for the point and thawed before anything is exported, and the quiesced point is bit-exact,
    guest writes during the backup excluded."""
    vm = TestVM(tmp_path / "vm", {"vda": 16 * MiB, "vdb": 8 * MiB})
    vm.start()
    fake = FakeAgent(tmp_path / "qga.sock")
    try:
        vm.write("vda", 0, b"\x11" * (3 * MiB))
        vm.write("vdb", MiB, b"\x22" * MiB)
        seen: dict[str, bool] = {}
        truth: dict[str, Path] = {}

        def on_event(name, data):
            if name in ("quiesced", "freezing", "frozen", "exported"):
                seen[name] = fake.frozen
            if name == "exported":
                truth.update(vm.snapshot_refs("point"))
                vm.write("vda", MiB, b"\x33" * MiB)  # after the point: must not appear
            if name == "freezing":
                assert vm.status() == "paused"

        repo = Repository.open(str(tmp_path / "repo"), create=True)
        res = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(tmp_path), quiesce=True,
                                             qga=fake.path, on_event=on_event))
        assert seen == {"quiesced": True, "freezing": True, "frozen": False, "exported": False}
        assert res.manifest.consistency == "quiesced" and res.manifest.extra["quiesce"]["filesystems"] == 2
        assert_point_matches(repo, res.manifest, truth)
        assert not fake.frozen
    finally:
        fake.close()
        vm.quit()


# -- libvirt -----------------------------------------------------------------------------------------------


class LibvirtGuest:
    """The same guest as a libvirt domain (direct kernel boot, an agent channel libvirt owns)."""

    def __init__(self, conn, workdir: Path, name: str) -> None:
        import libvirt_env

        self.name = name
        self.console_path = workdir / "console.log"
        root = guest.make_rootfs(workdir / "root.qcow2", INIT, size_mib=48, agent=True,
                                 files={"/etc/fleece-hook": HOOK}, modes={"/etc/fleece-hook": 0o755})
        d = guest.build()
        self.dom = libvirt_env.define_domain(
            conn, name, [("vda", root, "virtio")], memory_mib=256, serial=self.console_path, agent=True,
            boot=(d / "vmlinuz", d / "initrd.gz", "console=ttyS0 quiet panic=-1"))
        self.dom.create()

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console():
            assert guest.FAIL not in self.console(), self.console()[-2000:]
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.console()[-2000:]}"
            time.sleep(0.1)

    def status(self) -> str:
        import libvirt_qemu

        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, '{"execute": "guest-fsfreeze-status"}', 5,
                                                        0))["return"]

    def wait_thawed(self, within: float) -> None:
        deadline = time.monotonic() + within
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if last == "thawed":
                    return
            except Exception as e:  # noqa: BLE001 - the agent not connected yet
                last = repr(e)
            time.sleep(0.5)
        raise AssertionError(f"domain {self.name} is not thawed within {within} s: {last}")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.dom.destroy()
        with contextlib.suppress(Exception):
            self.dom.undefineFlags(0x20)  # VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA


@pytest.fixture(scope="module")
def lv_guest(libvirtd, tmp_path_factory):
    from fleece.exporter import virt

    conn = virt.connect(libvirtd.uri)
    g = LibvirtGuest(conn, tmp_path_factory.mktemp("lvq"), "qlv")
    try:
        g.wait_for("FLEECE-AGENT-UP", 120)
        g.wait_thawed(60)
        g.wait_for("FLEECE-CHURN 8", 60)
        yield g
    finally:
        g.destroy()
        conn.close()


@pytest.fixture
def lv_scratch():
    d = Path(tempfile.mkdtemp(prefix="flq-", dir="/var/tmp"))  # short, outside libvirtd's private /run
    yield d
    shutil.rmtree(d, ignore_errors=True)


def lv_backup(g: LibvirtGuest, libvirtd, repo: str, scratch: Path, *extra: str) -> dict:
    return ok(fleece("backup", "--libvirt", g.name, "--connect", libvirtd.uri, "--repo", repo, "--scratch",
                     str(scratch), "--json", *extra))


def lv_churn(g: LibvirtGuest) -> int:
    return max(int(n) for n in re.findall(r"FLEECE-CHURN (\d+)", g.console()))


def test_libvirt_domain_quiesced_through_libvirts_agent(lv_guest, libvirtd, tmp_path, lv_scratch) -> None:
    g = lv_guest
    repo = str(tmp_path / "repo")
    for n, kind in enumerate(["full", "incremental"]):
        tokens = len(re.findall(r"FLEECE-HOOK freeze (\S+)", g.console()))
        doc = lv_backup(g, libvirtd, repo, lv_scratch, "--quiesce")
        assert doc["kind"] == kind and doc["consistency"] == "quiesced", doc
        assert doc["quiesce"]["filesystems"] >= 1 and doc["quiesce"]["thawed"] is True
        new = re.findall(r"FLEECE-HOOK freeze (\S+)", g.console())[tokens:]
        assert len(new) == 1, new
        out = tmp_path / f"r{n}"
        ok(fleece("restore", "--repo", repo, "--vm", g.name, "--point", doc["id"], "--out", str(out), "--flat",
                  "--format", "raw", "--json"))
        [image] = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert guest.read_file(image, "/data/hooked", fmt="raw").decode().strip() == new[0]
        e2fsck_clean(image)
        assert g.status() == "thawed"
        before = lv_churn(g)
        g.wait_for(f"FLEECE-CHURN {before + 8}", 60)


def test_libvirt_someone_elses_freeze_is_left_alone(lv_guest, libvirtd, tmp_path, lv_scratch) -> None:
    """An administrator froze the guest (virsh domfsfreeze): the point is crash-consistent, says so, and
    the guest is still frozen after the backup — thawing it is theirs."""
    g = lv_guest
    g.dom.fsFreeze(None, 0)
    try:
        doc = lv_backup(g, libvirtd, str(tmp_path / "repo"), lv_scratch, "--quiesce")
        assert doc["consistency"] == "crash" and "already frozen" in doc["quiesce"]["reason"], doc
        assert g.status() == "frozen"
    finally:
        g.dom.fsThaw(None, 0)
    g.wait_thawed(10)


LV_KILLER = """
import os, signal, sys
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository

repo, domain, uri, scratch = sys.argv[1:]

def on_event(name, data):
    if name == "quiesced":
        os.kill(os.getpid(), signal.SIGKILL)

run_backup(Repository.open(repo, create=True), BackupRequest(libvirt=domain, connect=uri, scratch=scratch,
                                                             quiesce=True, on_event=on_event))
"""


def test_libvirt_run_killed_while_frozen_is_thawed_by_the_guard(lv_guest, libvirtd, tmp_path, lv_scratch) -> None:
    g = lv_guest
    repo = str(tmp_path / "repo")
    p = subprocess.run([str(Path(FLEECE).parent / "python"), "-c", LV_KILLER, repo, g.name, libvirtd.uri,
                        str(lv_scratch)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    g.wait_thawed(30)
    before = lv_churn(g)
    g.wait_for(f"FLEECE-CHURN {before + 8}", 60)
    doc = lv_backup(g, libvirtd, repo, lv_scratch, "--quiesce")
    assert doc["kind"] == "full" and doc["consistency"] == "quiesced", doc


@pytest.mark.parametrize("channel", [True, False])
def test_libvirt_domain_without_an_agent_is_crash_consistent(libvirtd, tmp_path, lv_scratch, channel) -> None:
    """A channel nobody in the guest opened, or no channel at all: a crash point that says which, at once
    (no timeout), and no thaw attempted (nothing can be frozen)."""
    import libvirt_env
    from fleece.exporter import virt

    conn = virt.connect(libvirtd.uri)
    img = libvirt_env.qemu_image(tmp_path / "vda.qcow2", 8 * MiB, "write -P 0x5a 0 1M")
    dom = libvirt_env.define_domain(conn, f"noagent{int(channel)}", [("vda", img, "virtio")], agent=channel)
    dom.create()
    try:
        t0 = time.monotonic()
        p = fleece("backup", "--libvirt", dom.name(), "--connect", libvirtd.uri, "--repo", str(tmp_path / "repo"),
                   "--scratch", str(lv_scratch), "--json", "--quiesce", "--quiesce-timeout", "20")
        doc = ok(p)
        assert time.monotonic() - t0 < 20, "waited for an agent that is not there"
        assert doc["consistency"] == "crash"
        want = "no guest agent is connected" if channel else "has no guest agent channel"
        assert want in doc["quiesce"]["reason"], doc
        assert "thaw attempt" not in p.stderr and "may be frozen" not in p.stderr, p.stderr
    finally:
        dom.destroy()
        dom.undefineFlags(0x20)
        conn.close()
