"""``fleece backup --libvirt DOMAIN`` / ``--all`` end to end: a real private libvirtd (tools/libvirtd), real
TCG domains, libvirt's own pull-mode backup and checkpoints, real NBD, a real repository.

Each domain has a virtio disk (vda, 32 MiB) and a scsi disk (sda, odd-sized) prefilled offline with random
data; a model (bytearray per disk) follows every simulated guest write (qemu-io on the *device*, the way
a guest write goes). A point must equal the model at its freeze, byte for byte, whatever the guest does
after it — writes, write-zeroes, zero-filled writes on a ``detect_zeroes`` disk, discards — in every
window of the run (the run's events act at exact moments).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="python3-libvirt is not installed (tools/setup installs it)")

import libvirt_env  # noqa: E402
from checks import FLEECE, fleece, materialize, ok, qemu_img  # noqa: E402
from conftest import ODD_SIZE, MiB  # noqa: E402
from fleece.exporter import virt  # noqa: E402
from fleece.exporter.backup import BackupRequest, run_backup  # noqa: E402
from fleece.repository import Repository  # noqa: E402
from fleece.repository.errors import BackupBusyError  # noqa: E402

SIZES = {"vda": 32 * MiB, "sda": ODD_SIZE}


@pytest.fixture(scope="module")
def conn(libvirtd):
    c = virt.connect(libvirtd.uri)
    yield c
    c.close()


@pytest.fixture
def scratch():
    """Short (the NBD socket lives in it: 107 bytes at most) and outside /run (libvirtd's namespace)."""
    d = Path(tempfile.mkdtemp(prefix="flv-", dir="/var/tmp"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


class Domain(libvirt_env.Modelled):
    """A running TCG domain and the model of what its guest sees."""

    def __init__(self, conn, workdir: Path, name: str | None = None, uuid: str | None = None,
                 formats: dict[str, str] | None = None, start: bool = True, **kw) -> None:
        self.conn = conn
        self.dir = workdir
        self.gone = False
        self.model: dict[str, bytearray] = {}
        disks = []
        for t, bus in (("vda", "virtio"), ("sda", "scsi")):
            data = bytearray(os.urandom(SIZES[t]))
            data[12 * MiB:16 * MiB] = bytes(4 * MiB)  # a hole in the middle
            raw = workdir / f"{t}.truth"
            raw.write_bytes(data)
            fmt = (formats or {}).get(t, "qcow2")
            img = workdir / f"{t}.{fmt}"
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(img)], check=True)
            raw.unlink()
            self.model[t] = data
            disks.append((t, img, bus, fmt))
        self.name = name or f"lv-{uuidlib.uuid4().hex[:8]}"
        self.dom = libvirt_env.define_domain(conn, self.name, disks, uuid=uuid, **kw)
        if start:
            self.dom.create()

    def discard(self, t: str, off: int, length: int) -> None:
        """A guest discard outside a backup job: the qcow2 (no backing file, discard='unmap') then reads
        zeros there — checked, not assumed."""
        libvirt_env.guest_write(self.dom, t, f"discard {off} {length}")
        libvirt_env.guest_write(self.dom, t, f"read -P 0 {off} {length}")
        self.model[t][off:off + length] = bytes(length)

    def checkpoints(self) -> list[str]:
        return [c.name for c in virt.checkpoints(self.dom)]

    def destroy(self) -> None:
        if self.gone:
            return
        self.gone = True
        try:
            virt.end_backup(self.dom)
        except Exception:  # noqa: BLE001
            pass
        if self.dom.isActive():
            self.dom.destroy()
        self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


@pytest.fixture
def domains(conn, tmp_path):
    made: list[Domain] = []

    def make(**kw) -> Domain:
        d = tmp_path / f"d{len(made)}"
        d.mkdir()
        dom = Domain(conn, d, **kw)
        made.append(dom)
        return dom

    yield make
    for dom in made:
        dom.destroy()


def backup(dom: Domain, libvirtd, repo: str, scratch: Path, *extra: str) -> dict:
    return ok(fleece("backup", "--libvirt", dom.name, "--connect", libvirtd.uri, "--repo", repo,
                     "--scratch", str(scratch), "--json", *extra))


def assert_exact(repo_url: str, vm: str, point: str, truth: dict[str, bytes]) -> None:
    repo = Repository.open(repo_url)
    m = repo.manifest(vm, point)
    assert set(m.disks) == set(truth)
    for t, want in truth.items():
        got = materialize(repo, m, t)
        assert len(got) == len(want), (t, len(got), len(want))
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(f"{t} of point {point} differs from the truth at byte {first}")


def no_job_left(dom: Domain, scratch: Path) -> None:
    assert virt.active_backup(dom.dom) is None
    assert not list(scratch.iterdir()), list(scratch.iterdir())  # run dir, socket and scratch images gone


def ours(dom: Domain, repo_url: str) -> list[str]:
    prefix = f"fleece-{Repository.open(repo_url).config.id[:12]}-"
    return [c for c in dom.checkpoints() if c.startswith(prefix)]


# -- full, incremental, restore -----------------------------------------------------------------------------


def test_full_then_incremental_restores_exact(domains, libvirtd, tmp_path, scratch) -> None:
    dom = domains()
    repo = str(tmp_path / "repo")
    full = backup(dom, libvirtd, repo, scratch)
    assert full["kind"] == "full" and set(full["disks"]) == {"vda", "sda"} and full["vm"] == dom.name
    assert full["pause_ms"] is None and full["freeze_ms"] > 0  # libvirt fixed the point, fleece paused nothing
    # a full reads the data, not the hole (the export's own base:allocation)
    assert full["disks"]["vda"]["read_bytes"] <= SIZES["vda"] - 4 * MiB
    assert_exact(repo, dom.name, full["id"], dom.snapshot())
    assert ours(dom, repo) == [f"fleece-{Repository.open(repo).config.id[:12]}-{full['id']}"]
    no_job_left(dom, scratch)
    m = Repository.open(repo).manifest(dom.name, full["id"])
    assert m.extra["machine"]["uuid"] == dom.dom.UUIDString() and m.extra["libvirt"]["domain"] == dom.name

    dom.write("vda", 0, MiB, 0x5A)  # the first byte
    dom.zero("vda", 4 * MiB - 64 * 1024, 128 * 1024)  # across the 4 MiB grid line
    dom.write("sda", ODD_SIZE - 512, 512, 0xEE)  # the last sector of the odd-sized disk
    dom.discard("sda", 2 * MiB, MiB)
    inc = backup(dom, libvirtd, repo, scratch)
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert inc["disks"]["vda"]["kind"] == "incremental" and inc["disks"]["sda"]["kind"] == "incremental"
    # only what changed (64 KiB granules): 1 MiB + 128 KiB on vda; on sda 1 MiB + the last granule, which
    # the odd size cuts to 4608 bytes
    assert inc["disks"]["vda"]["dirty_bytes"] == MiB + 128 * 1024
    assert inc["disks"]["sda"]["dirty_bytes"] == MiB + ODD_SIZE % (64 * 1024)
    assert_exact(repo, dom.name, inc["id"], dom.snapshot())
    # the parent's checkpoint went after the commit; the new one is the only one of this repository
    assert ours(dom, repo) == [f"fleece-{Repository.open(repo).config.id[:12]}-{inc['id']}"]
    no_job_left(dom, scratch)

    # a restore of the chain, compared with qemu-img against the truth
    out = tmp_path / "out"
    ok(fleece("restore", "--repo", repo, "--vm", dom.name, "--out", str(out), "--json"))
    for t, want in dom.snapshot().items():
        ref = tmp_path / f"{t}.truth"
        ref.write_bytes(want)
        image = next(out.glob(f"{t}*.qcow2"))
        p = qemu_img("compare", "-F", "raw", str(image), str(ref))
        assert p.returncode == 0, p.stdout + p.stderr
        assert (image.stat().st_mode & 0o077) == 0


def test_disk_subsets_keep_the_other_disks_checkpoint(domains, libvirtd, tmp_path, scratch) -> None:
    """libvirt deletes a checkpoint on every disk at once: a run of vda alone must not delete the
    checkpoint sda's next incremental builds on; each disk is incremental from its own parent."""
    dom = domains()
    repo = str(tmp_path / "repo")
    full = backup(dom, libvirtd, repo, scratch)
    dom.write("vda", MiB, MiB, 0x21)
    dom.write("sda", 2 * MiB, MiB, 0x22)
    only_vda = backup(dom, libvirtd, repo, scratch, "--disk", "vda")
    assert set(only_vda["disks"]) == {"vda"} and only_vda["disks"]["vda"]["kind"] == "incremental"
    prefix = f"fleece-{Repository.open(repo).config.id[:12]}-"
    assert sorted(ours(dom, repo)) == sorted([prefix + full["id"], prefix + only_vda["id"]])
    dom.write("vda", 6 * MiB, MiB, 0x23)
    both = backup(dom, libvirtd, repo, scratch)
    assert both["disks"]["vda"]["kind"] == both["disks"]["sda"]["kind"] == "incremental"
    assert both["disks"]["vda"]["parent"] == only_vda["id"] and both["disks"]["sda"]["parent"] == full["id"]
    assert both["disks"]["vda"]["dirty_bytes"] == MiB and both["disks"]["sda"]["dirty_bytes"] == MiB
    assert_exact(repo, dom.name, both["id"], dom.snapshot())
    assert ours(dom, repo) == [prefix + both["id"]]  # neither older checkpoint is needed any more


def test_raw_disk_is_full_every_time_next_to_an_incremental_qcow2(domains, libvirtd, tmp_path, scratch) -> None:
    dom = domains(formats={"sda": "raw"})
    repo = str(tmp_path / "repo")
    full = backup(dom, libvirtd, repo, scratch)
    cp = virt.checkpoint_disks(dom.dom, ours(dom, repo)[0])
    assert set(cp) == {"vda"}  # no bitmap on the raw disk: it cannot hold one
    dom.write("vda", 0, MiB, 0x31)
    dom.write("sda", 0, MiB, 0x32)
    second = backup(dom, libvirtd, repo, scratch)
    assert second["disks"]["vda"]["kind"] == "incremental" and second["disks"]["sda"]["kind"] == "full"
    assert "cannot hold" in second["disks"]["sda"]["reason"]
    assert_exact(repo, dom.name, second["id"], dom.snapshot())
    assert second["new_blobs"] <= 4  # the raw disk's unchanged cells dedup against the first full
    assert full["kind"] == "full"


def test_two_repositories_keep_their_own_checkpoints(domains, libvirtd, tmp_path, scratch) -> None:
    """Another repository's (or tool's) checkpoints are never deleted, and each repository's incrementals
    cover exactly what changed since its own last point."""
    dom = domains()
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    backup(dom, libvirtd, one, scratch)
    dom.write("vda", 0, MiB, 0x41)
    backup(dom, libvirtd, two, scratch)
    dom.write("vda", 4 * MiB, MiB, 0x42)
    a = backup(dom, libvirtd, one, scratch)
    assert a["kind"] == "incremental" and a["disks"]["vda"]["dirty_bytes"] == 2 * MiB
    b = backup(dom, libvirtd, two, scratch)
    assert b["kind"] == "incremental" and b["disks"]["vda"]["dirty_bytes"] == MiB
    assert len(ours(dom, one)) == 1 and len(ours(dom, two)) == 1
    for repo, doc in ((one, a), (two, b)):
        assert_exact(repo, dom.name, doc["id"], dom.snapshot())


# -- the guest is hostile: every window of the run ----------------------------------------------------------


WINDOWS = ["frozen", "exported", "planning", "disk", "pulled", "flushing", "committing"]
AFTER_THE_JOB = ("flushing", "committing")  # libvirt's job has ended: the export is gone, discards apply


@pytest.mark.parametrize("level", ["full", "incremental"])
def test_guest_writes_zeroes_and_discards_after_the_freeze_never_reach_the_point(domains, libvirtd, tmp_path,
                                                                                  scratch, level) -> None:
    """FIELD-NOTES §5e through libvirt: zeroing and discarding data after the freeze, in every window
    (after the freeze, after the exports, between the plan's status queries, during the pull, after it,
    during the upload and before the commit), on a ``detect_zeroes='unmap'`` domain (zero-filled writes
    become write-zeroes) — the point keeps the data, and the next incremental holds every one of those
    changes (the new checkpoint recorded them)."""
    dom = domains(detect_zeroes="unmap")
    repo_url = str(tmp_path / "repo")
    repo = Repository.open(repo_url, create=True)
    uri = libvirtd.uri
    if level == "incremental":
        run_backup(repo, BackupRequest(libvirt=dom.name, connect=uri, scratch=str(scratch)))
        for t in ("vda", "sda"):
            for i in range(len(WINDOWS)):  # dirty everything the windows will hit, so the plan reads it
                dom.write(t, (1 + 2 * i) * MiB, MiB, 0x30 + i)
    truth: dict[str, bytes] = {}
    acted: list[str] = []

    def on_event(name: str, data: dict) -> None:
        if name == "frozen":
            truth.update(dom.snapshot())
        if name not in WINDOWS or name in acted:
            return
        acted.append(name)
        i = WINDOWS.index(name)
        for t in ("vda", "sda"):
            off = (1 + 2 * i) * MiB
            dom.zero(t, off, 256 * 1024)
            libvirt_env.guest_write(dom.dom, t, f"write -P 0 {off + 256 * 1024} 256k")  # detect_zeroes: zeroes
            dom.model[t][off + 256 * 1024:off + 512 * 1024] = bytes(256 * 1024)
            if name in AFTER_THE_JOB:
                dom.discard(t, off + 512 * 1024, 256 * 1024)  # reads back as zeros (checked)
            else:
                libvirt_env.guest_write(dom.dom, t, f"discard {off + 512 * 1024} 256k")  # dropped during a job
            dom.write(t, off + 768 * 1024, 256 * 1024, 0x77)

    result = run_backup(repo, BackupRequest(libvirt=dom.name, connect=uri, scratch=str(scratch), on_event=on_event))
    assert sorted(acted) == sorted(WINDOWS)
    assert result.manifest.kind == level
    assert_exact(repo_url, dom.name, result.manifest.id, truth)
    no_job_left(dom, scratch)
    following = run_backup(Repository.open(repo_url), BackupRequest(libvirt=dom.name, connect=uri,
                                                                    scratch=str(scratch)))
    assert following.manifest.kind == "incremental" and following.manifest.parent == result.manifest.id
    assert_exact(repo_url, dom.name, following.manifest.id, dom.snapshot())


# -- failures: killed client, failed run, killed QEMU ---------------------------------------------------------


KILLER = """
import os, signal, sys
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository

repo, domain, uri, scratch, moment = sys.argv[1:]

def on_event(name, data):
    if name == moment:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no rollback: what a power cut or OOM kill leaves

run_backup(Repository.open(repo), BackupRequest(libvirt=domain, connect=uri, scratch=scratch, full=True,
                                                on_event=on_event))
"""


@pytest.mark.parametrize("moment", ["disk", "flushing"])
def test_killed_run_is_cleaned_up_and_the_next_incremental_is_exact(domains, libvirtd, tmp_path, scratch,
                                                                    moment) -> None:
    """SIGKILL during the pull (libvirt's job stays, exported, with the run's checkpoint) or after it
    (job ended, uploads under way): no point, and the next run ends the job, deletes the dead run's
    checkpoint and is an exact incremental from the parent — whose checkpoint never stopped recording."""
    dom = domains()
    repo = str(tmp_path / "repo")
    full = backup(dom, libvirtd, repo, scratch)
    dom.write("vda", 5 * MiB, 2 * MiB, 0x41)
    p = subprocess.run([str(Path(FLEECE).parent / "python"), "-c", KILLER, repo, dom.name, libvirtd.uri, str(scratch),
                        moment], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (virt.active_backup(dom.dom) is not None) == (moment == "disk")  # libvirt's job outlives its client
    assert len(ours(dom, repo)) == 2  # the killed run's checkpoint stayed too
    assert Repository.open(repo).point_ids(dom.name) == [full["id"]]  # no half-written point
    dom.write("sda", 0, MiB, 0x42)  # after the killed run

    p = fleece("backup", "--libvirt", dom.name, "--connect", libvirtd.uri, "--repo", repo, "--scratch", str(scratch),
               "--json")
    doc = ok(p)
    assert ("ended the backup job it left running" in p.stderr) == (moment == "disk"), p.stderr
    assert "deleted checkpoint" in p.stderr and "left by a run that did not commit" in p.stderr
    assert doc["kind"] == "incremental" and doc["parent"] == full["id"]
    assert doc["disks"]["vda"]["dirty_bytes"] == 2 * MiB and doc["disks"]["sda"]["dirty_bytes"] == MiB
    assert_exact(repo, dom.name, doc["id"], dom.snapshot())
    assert ours(dom, repo) == [f"fleece-{Repository.open(repo).config.id[:12]}-{doc['id']}"]
    no_job_left(dom, scratch)  # the dead run's directory in --scratch too (rundir.py removes a dead pid's)


def test_failed_run_ends_its_job_and_drops_its_checkpoint(domains, libvirtd, tmp_path, scratch) -> None:
    dom = domains()
    repo_url = str(tmp_path / "repo")
    repo = Repository.open(repo_url, create=True)
    first = run_backup(repo, BackupRequest(libvirt=dom.name, connect=libvirtd.uri, scratch=str(scratch)))
    before = ours(dom, repo_url)
    dom.write("vda", 0, MiB, 0x61)

    def fail_at_commit(name: str, data: dict) -> None:
        if name == "committing":
            dom.write("vda", 8 * MiB, MiB, 0x62)  # the guest keeps writing: the next incremental must see it
            raise RuntimeError("injected failure before the commit")

    with pytest.raises(RuntimeError, match="injected"):
        run_backup(repo, BackupRequest(libvirt=dom.name, connect=libvirtd.uri, scratch=str(scratch),
                                       on_event=fail_at_commit))
    assert ours(dom, repo_url) == before and repo.point_ids(dom.name) == [first.manifest.id]
    no_job_left(dom, scratch)
    again = run_backup(Repository.open(repo_url),
                       BackupRequest(libvirt=dom.name, connect=libvirtd.uri, scratch=str(scratch)))
    assert again.manifest.kind == "incremental" and again.manifest.disks["vda"].stats["dirty_bytes"] == 2 * MiB
    assert_exact(repo_url, dom.name, again.manifest.id, dom.snapshot())


TERMINATOR = """
import os, signal, sys
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import Repository

repo, domain, uri, scratch = sys.argv[1:]

def on_event(name, data):
    if name == "disk":
        os.kill(os.getpid(), signal.SIGTERM)  # what systemd's stop sends

try:
    run_backup(Repository.open(repo), BackupRequest(libvirt=domain, connect=uri, scratch=scratch, on_event=on_event))
except KeyboardInterrupt:
    sys.exit(42)
"""


def test_sigterm_rolls_back_and_a_paused_domain_stays_paused(domains, libvirtd, tmp_path, scratch) -> None:
    dom = domains()
    repo = str(tmp_path / "repo")
    full = backup(dom, libvirtd, repo, scratch)
    before = ours(dom, repo)
    dom.write("vda", 0, MiB, 0x71)
    p = subprocess.run([str(Path(FLEECE).parent / "python"), "-c", TERMINATOR, repo, dom.name, libvirtd.uri,
                        str(scratch)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 42, p.stderr  # interrupted, after the rollback
    assert ours(dom, repo) == before and Repository.open(repo).point_ids(dom.name) == [full["id"]]
    no_job_left(dom, scratch)

    dom.dom.suspend()  # a paused domain is backed up as it is, and left paused
    try:
        doc = backup(dom, libvirtd, repo, scratch)
        assert doc["kind"] == "incremental" and doc["vm_state"] == "paused"
        assert doc["disks"]["vda"]["dirty_bytes"] == MiB
        assert dom.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert_exact(repo, dom.name, doc["id"], dom.snapshot())
    finally:
        dom.dom.resume()


def qemu_pid(libvirtd, dom: Domain) -> int:
    for pidfile in libvirtd.dir.rglob(f"{dom.name}.pid"):
        return int(pidfile.read_text().strip())
    raise AssertionError(f"no pid file of {dom.name} under {libvirtd.dir}")


def test_qemu_killed_means_a_logged_full(domains, libvirtd, tmp_path, scratch) -> None:
    dom = domains()
    repo = str(tmp_path / "repo")
    backup(dom, libvirtd, repo, scratch)
    os.kill(qemu_pid(libvirtd, dom), signal.SIGKILL)  # the checkpoint's bitmap was never written to the qcow2
    deadline = time.monotonic() + 20
    while dom.dom.isActive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    dom.dom.create()
    dom.write("vda", 3 * MiB, MiB, 0x51)
    p = fleece("backup", "--libvirt", dom.name, "--connect", libvirtd.uri, "--repo", repo, "--scratch", str(scratch),
               "--json")
    doc = ok(p)
    assert doc["kind"] == "full", doc
    assert "inconsistent" in p.stderr or "gone" in p.stderr, p.stderr
    assert_exact(repo, dom.name, doc["id"], dom.snapshot())
    assert ours(dom, repo) == [f"fleece-{Repository.open(repo).config.id[:12]}-{doc['id']}"]
    dom.write("sda", 0, MiB, 0x52)
    inc = backup(dom, libvirtd, repo, scratch)  # and from there incremental again
    assert inc["kind"] == "incremental" and inc["disks"]["sda"]["dirty_bytes"] == MiB
    assert_exact(repo, dom.name, inc["id"], dom.snapshot())


# -- many domains, other tools, identity ----------------------------------------------------------------------


def test_all_backs_up_every_domain_and_leaves_another_tools_job_alone(domains, libvirtd, tmp_path,
                                                                      scratch) -> None:
    a, b, busy = domains(), domains(), domains()
    other = tmp_path / "other"  # another tool's pull backup, running on one domain
    other.mkdir(mode=0o700)
    virt.begin_pull_backup(busy.dom, str(other / "nbd.sock"), str(other), {"vda": "full"}, None, None)
    repo = str(tmp_path / "repo")
    p = fleece("backup", "--all", "--connect", libvirtd.uri, "--repo", repo, "--scratch", str(scratch), "--json")
    doc = json.loads(p.stdout)
    assert p.returncode == BackupBusyError.exit and doc["ok"] is False, p.stderr
    results = {r["domain"]: r for r in doc["domains"]}
    assert {a.name, b.name, busy.name} <= set(results)
    assert results[busy.name]["ok"] is False and results[busy.name]["error"]["kind"] == "busy"
    assert "virsh domjobabort" in results[busy.name]["error"]["message"]
    job = virt.active_backup(busy.dom)
    assert job is not None and job.socket == str(other / "nbd.sock")  # not ours: untouched
    for d in (a, b):
        assert results[d.name]["ok"] is True and results[d.name]["kind"] == "full"
        assert_exact(repo, d.name, results[d.name]["id"], d.snapshot())
    virt.end_backup(busy.dom)


def test_same_name_other_domain_is_refused(domains, libvirtd, tmp_path, scratch) -> None:
    first = domains()
    name = first.name
    repo = str(tmp_path / "repo")
    backup(first, libvirtd, repo, scratch)
    first.destroy()
    second = domains(name=name)  # a new domain under the old name: another UUID, other disks
    p = fleece("backup", "--libvirt", name, "--connect", libvirtd.uri, "--repo", repo, "--scratch", str(scratch))
    assert p.returncode != 0 and "belongs to another machine" in p.stderr and "--adopt" in p.stderr
    assert len(Repository.open(repo).point_ids(name)) == 1
    assert virt.active_backup(second.dom) is None and second.checkpoints() == []


def test_bad_libvirt_arguments(domains, libvirtd, tmp_path, scratch) -> None:
    repo = str(tmp_path / "repo")
    off = domains(start=False)
    p = fleece("backup", "--libvirt", off.name, "--connect", libvirtd.uri, "--repo", repo, "--scratch", str(scratch))
    assert p.returncode == 2 and "is shut off" in p.stderr and "--image" in p.stderr, p.stderr
    p = fleece("backup", "--libvirt", "no-such-domain", "--connect", libvirtd.uri, "--repo", repo)
    assert p.returncode == 2 and "no libvirt domain 'no-such-domain'" in p.stderr
    assert p.stderr.count("\n") == 1
    p = fleece("backup", "--libvirt", "x", "--qmp", "/nonexistent", "--repo", repo)
    assert p.returncode == 2 and "exclude each other" in p.stderr
    p = fleece("backup", "--all", "--vm", "x", "--repo", repo)
    assert p.returncode == 2 and "--all" in p.stderr
    p = fleece("backup", "--qmp", "/nonexistent", "--connect", libvirtd.uri, "--repo", repo)
    assert p.returncode == 2 and "--connect" in p.stderr
    assert not Path(repo).exists()  # no repository left by a run that could not start


# -- QEMU as an unprivileged user (a stock Debian libvirtd) -------------------------------------------------

QEMU_UID = 64055  # libvirt-qemu, as tools/libvirtd --qemu-user runs it


@pytest.fixture(scope="module")
def unprivileged():
    """A second private libvirtd whose QEMU runs as libvirt-qemu with dynamic_ownership, as Debian's
    does; a 0711 base under /var/tmp (QEMU's user must reach the images and the scratch directory)."""
    base = Path(tempfile.mkdtemp(prefix="flu-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        d = libvirt_env.start(base / "d", qemu_user=True)
    except libvirt_env.Unavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the private libvirtd (--qemu-user) does not start under CI: {e}")
        pytest.skip(str(e))
    conn = virt.connect(d.uri)
    try:
        yield conn, d, base
    finally:
        conn.close()
        libvirt_env.stop(base / "d")
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_qemu_as_an_unprivileged_user_gets_its_own_run_directory(unprivileged, tmp_path) -> None:
    """libvirt's QEMU (uid 64055) must create the NBD socket and open the scratch images in fleece's run
    directory: it gets a 0700 subdirectory of its own for the socket in a 0711 run directory, where
    libvirtd makes the scratch images (labelled for QEMU, no group/other access), and full + incremental
    are exact."""
    conn, d, base = unprivileged
    work = base / f"img-{uuidlib.uuid4().hex[:6]}"
    work.mkdir(mode=0o711)
    work.chmod(0o711)
    scratch = base / "scratch"
    scratch.mkdir(mode=0o711, exist_ok=True)
    dom = Domain(conn, work)
    try:
        assert virt.qemu_owner(dom.dom) == (QEMU_UID, QEMU_UID)
        repo = str(tmp_path / "repo")
        seen: dict[str, object] = {}

        def on_event(name, data):
            if name == "exported":
                [run] = list(scratch.iterdir())
                sub = run / "qemu"
                seen["run"] = (run.stat().st_uid, run.stat().st_mode & 0o777)
                seen["sub"] = (sub.stat().st_uid, sub.stat().st_mode & 0o777)
                seen["files"] = sorted(p.name for p in sub.iterdir())
                seen["modes"] = {p.name: (p.stat().st_uid, p.stat().st_mode & 0o077) for p in run.iterdir()
                                 if p.name.endswith(".scratch")}
                dom.write("vda", 2 * MiB, MiB, 0x66)  # after the point: must not appear

        truth = dom.snapshot()
        r = run_backup(Repository.open(repo, create=True),
                       BackupRequest(libvirt=dom.name, connect=d.uri, scratch=str(scratch), on_event=on_event))
        assert seen["run"] == (0, 0o711) and seen["sub"] == (QEMU_UID, 0o700), seen
        assert seen["files"] == ["nbd.sock"], seen  # QEMU's own directory: only what QEMU creates
        assert set(seen["modes"]) == {"vda.scratch", "sda.scratch"}, seen  # libvirtd's, in root's directory
        assert all(m == 0 for _, m in seen["modes"].values()), seen["modes"]  # no group/other access
        assert_exact(repo, dom.name, r.manifest.id, truth)
        no_job_left(dom, scratch)

        dom.write("sda", MiB, 3 * MiB, 0x67)
        doc = ok(fleece("backup", "--libvirt", dom.name, "--connect", d.uri, "--repo", repo, "--scratch",
                        str(scratch), "--json"))
        assert doc["kind"] == "incremental" and doc["disks"]["sda"]["dirty_bytes"] == 3 * MiB, doc
        assert_exact(repo, dom.name, doc["id"], dom.snapshot())
        no_job_left(dom, scratch)

        hidden = base / "private"
        hidden.mkdir(mode=0o700)
        hidden.chmod(0o700)
        before = dom.checkpoints()
        p = fleece("backup", "--libvirt", dom.name, "--connect", d.uri, "--repo", repo, "--scratch", str(hidden))
        assert p.returncode == 2, p.stderr
        assert f"as uid {QEMU_UID}" in p.stderr and str(hidden) in p.stderr and "--scratch" in p.stderr, p.stderr
        assert dom.checkpoints() == before and virt.active_backup(dom.dom) is None and dom.dom.isActive()
        assert not list(hidden.iterdir())
        assert len(Repository.open(repo).point_ids(dom.name)) == 2
    finally:
        dom.destroy()
