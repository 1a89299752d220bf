"""``fleece restore`` against what a hostile tester does to it, end to end (real VMs, the real command).

* ``--out`` a running VM's own image directory, ``--force``: refused before any work (exit 2), because
  replacing an image a QEMU has open loses every write the guest makes from then on; chain layers a VM
  uses (``DIR/<disk>/``) too, and the images a VM booted from a restore.
* ``kill -9`` of fleece alone (not its process group) mid-restore: its ``qemu-nbd`` dies with it, and the
  next restore removes what the killed one left (its run directory in ``$TMPDIR``, its partial images in
  ``--out``) — and nothing else: entries of live processes, symlinks and other names stay.
* an interrupted or failed restore removes the ``--out`` (and parents) it made itself;
* ``--out`` that cannot work — empty, a file, under a file, read-only — is a usage error before any work;
* a damaged index object: the error names it and says ``fleece rebuild-index --repo …``, which works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import FLEECE, children, comm, fleece, identical, qemu_img
from conftest import MiB, is_root
from fleece.repository import Manifest, RepoConfig, Repository
from test_backup import backup
from vm import TestVM, random_bytes

IN_USE = "is in use (a running QEMU holds its lock): stop that VM first, or restore into another --out"


@dataclass
class World:
    vm: TestVM  # running: its own directory is the --out of the data-loss test
    work: Path
    repo_dir: Path
    points: list[Manifest]
    refs: dict[str, Path]  # ground truth of the last point


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A VM backed up twice (a full and an incremental): enough data that a restore with one worker
    keeps a qemu-nbd busy for a while (the kill tests catch it at work)."""
    work = tmp_path_factory.mktemp("hardening")
    vm = TestVM(work / "vm", {"vda": 32 * MiB, "vdb": 4 * MiB}, name="hardvm")
    vm.start()
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        repo = Repository.open(str(work / "repo"), create=True, config=RepoConfig(pack_target=4 * MiB))
        vm.write("vda", 0, random_bytes(24 * MiB, 1))
        vm.write("vdb", MiB, random_bytes(MiB, 2))
        full, _ = backup(vm, repo, scratch)
        vm.write("vda", 24 * MiB, random_bytes(4 * MiB, 3))
        vm.write("vdb", 0, random_bytes(65536, 4))
        inc, rec = backup(vm, repo, scratch)
        yield World(vm, work, work / "repo", [full.manifest, inc.manifest], rec.refs)
    finally:
        vm.cleanup()


def listing(root: Path) -> dict[str, int]:
    """Every entry below *root* with its inode: what "nothing was replaced" means."""
    return {str(p.relative_to(root)): os.lstat(p).st_ino for p in sorted(root.rglob("*"))}


def error_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def restore(world: World, out: Path | str, *extra: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEECE, "restore", "--repo", str(world.repo_dir), "--vm", "hardvm", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# -- 1. never replace an image a running QEMU has open ---------------------------------------------------

@pytest.mark.parametrize("mode", [["--flat", "--force"], ["--force"], ["--flat", "--format", "qcow2"], []])
def test_restore_into_a_running_vms_image_directory_is_refused(world: World, mode: list[str]) -> None:
    vm = world.vm
    before = listing(vm.dir)
    for extra in ([], ["--json"]):
        p = restore(world, vm.dir, *mode, *extra)
        assert p.returncode == 2, (mode, p.returncode, p.stderr)
        assert f"{vm.dir / 'vda.qcow2'} {IN_USE}" in error_line(p), p.stderr
        if extra:
            assert json.loads(p.stdout)["error"]["kind"] == "usage"
    assert listing(vm.dir) == before  # checked before any work: not even a partial image was made
    # The VM still writes into the very file at its path (stopping flushes QEMU's qcow2 caches).
    vm.write("vda", 3 * MiB, random_bytes(MiB, 50 + len(mode)))
    vm.guest.cmd("stop")
    try:
        p = qemu_img("compare", "-U", "-F", "raw", str(vm.disks["vda"].image), str(vm.disks["vda"].reference))
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        vm.guest.cmd("cont")


def test_chain_layers_and_images_a_vm_booted_are_refused(world: World, tmp_path: Path) -> None:
    """A VM booted from a restore (``vda.qcow2``, its layers under ``vda/`` opened read-only), and one
    that uses a chain layer itself (``vdb/<full>.qcow2``, found only by looking into ``DIR/<disk>/``)."""
    out = tmp_path / "out"
    assert restore(world, out).returncode == 0
    full = world.points[0].id
    user = TestVM(tmp_path / "user", {"vda": 32 * MiB, "vdb": 4 * MiB}, name="user", truth=False,
                  images={"vda": out / "vda.qcow2", "vdb": out / "vdb" / f"{full}.qcow2"})
    user.start()
    try:
        before = listing(out)
        p = restore(world, out, "--force", "--disk", "vdb")
        assert p.returncode == 2, p.stderr
        assert f"{out / 'vdb' / f'{full}.qcow2'} {IN_USE}" in error_line(p)
        p = restore(world, out, "--force", "--disk", "vda")
        assert p.returncode == 2, p.stderr
        assert IN_USE in error_line(p) and str(out / "vda") in error_line(p)
        assert listing(out) == before
    finally:
        user.cleanup()
    p = restore(world, out, "--force")  # the VM is gone: replacing is fine again
    assert p.returncode == 0, p.stderr
    for disk, ref in world.refs.items():
        identical(out / f"{disk}.qcow2", ref)


# -- 2. kill -9: no orphan qemu-nbd, and the next restore cleans up ---------------------------------------

def _alive_nbd(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return comm(pid) == "qemu-nbd" and fields[0] != "Z"


def stop_while_serving(proc: subprocess.Popen[str]) -> int:
    """SIGSTOP *proc* (a fleece restore) at a moment its qemu-nbd runs; return that qemu-nbd's pid."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        nbd = [c for c in children(proc.pid) if comm(c) == "qemu-nbd"]
        if nbd:
            os.kill(proc.pid, signal.SIGSTOP)
            if nbd[0] in children(proc.pid) and _alive_nbd(nbd[0]):
                return nbd[0]
            os.kill(proc.pid, signal.SIGCONT)  # it was between two layers: try again
        time.sleep(0.002)
    raise AssertionError("the restore never ran a qemu-nbd: make the disk bigger")


def test_a_vm_started_on_the_old_images_during_a_forced_restore_keeps_them(world: World, tmp_path: Path) -> None:
    """A restore takes long; a VM booted meanwhile from the images it is about to replace is checked for
    again just before the replacement."""
    out = tmp_path / "out"
    assert restore(world, out).returncode == 0
    proc = subprocess.Popen([FLEECE, "restore", "--repo", str(world.repo_dir), "--vm", "hardvm", "--out", str(out),
                             "--force", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    user = TestVM(tmp_path / "user", {"vdb": 4 * MiB}, name="user", truth=False, images={"vdb": out / "vdb.qcow2"})
    try:
        stop_while_serving(proc)  # fetching vda or vdb: either way before vdb's images are replaced
        user.start()
        inode = os.stat(out / "vdb.qcow2").st_ino
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        assert f"{out / 'vdb.qcow2'} {IN_USE}" in stderr
        assert os.stat(out / "vdb.qcow2").st_ino == inode
        assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
        user.cleanup()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_sigkilled_restore_takes_its_qemu_nbd_along_and_the_next_one_cleans_up(world: World,
                                                                                tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"  # the restores' $TMPDIR, with names planted by others
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    dead = _dead_pid()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")
    planted = {f"fleece-restore-{os.getpid()}-live": "dir",  # a live process's run: stays
               f"fleece-restore-{dead}-link": "link",  # never followed, never removed
               f"fleece-restore-{dead}-file": "file",
               f"fleece-restore-{dead}x-odd": "dir"}  # not our name pattern
    for name, kind in planted.items():
        if kind == "dir":
            (tmp / name).mkdir()
        elif kind == "link":
            (tmp / name).symlink_to(victim)
        else:
            (tmp / name).write_bytes(b"x")
    out = tmp_path / "out"
    proc = subprocess.Popen([FLEECE, "restore", "--repo", str(world.repo_dir), "--vm", "hardvm", "--out", str(out),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    nbd = None
    try:
        nbd = stop_while_serving(proc)
        os.kill(proc.pid, signal.SIGKILL)  # fleece alone: its process group (and session) is not signalled
        proc.wait(30)
        deadline = time.monotonic() + 10
        while _alive_nbd(nbd) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive_nbd(nbd), "qemu-nbd outlived the fleece that started it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if nbd is not None and _alive_nbd(nbd):
            os.kill(nbd, signal.SIGKILL)  # the orphan this test made (before the fix)
    [left] = tmp.glob(f"fleece-restore-{proc.pid}-*")  # the killed run's directory, named with its pid
    assert left.is_dir() and not left.is_symlink()
    assert [p.name for p in out.iterdir() if p.name.endswith(".partial")], list(out.iterdir())

    p = restore(world, out, env=env)
    assert p.returncode == 0, p.stderr
    assert sorted(p.name for p in tmp.iterdir()) == sorted(planted)  # only the killed run's directory went
    assert (victim / "precious").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["vda", "vda.qcow2", "vdb", "vdb.qcow2"]  # no partials
    for disk, ref in world.refs.items():
        identical(out / f"{disk}.qcow2", ref)


def test_interrupted_restore_keeps_only_hidden_partials_and_resume_completes_it(world: World,
                                                                                tmp_path: Path) -> None:
    """SIGTERM (Ctrl-C alike) mid-restore: no image under a final name, only the hidden partial images
    and their journals (issue #13: resumable); qemu-nbd and the run directory go. ``--resume`` then
    finishes the very same images bit-exact and leaves no leftovers."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "made" / "by" / "restore"
    proc = subprocess.Popen([FLEECE, "restore", "--repo", str(world.repo_dir), "--vm", "hardvm", "--out", str(out),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    try:
        nbd = stop_while_serving(proc)
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    assert not _alive_nbd(nbd)
    assert not list(tmp.iterdir())
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".") for name in left), left
    assert any(name.endswith(".resume") for name in left), left
    p = subprocess.run([FLEECE, "restore", "--repo", str(world.repo_dir), "--vm", "hardvm", "--out", str(out),
                        "--resume", "--json"], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vda", "vda.qcow2", "vdb", "vdb.qcow2"]  # no leftovers
    for disk, ref in world.refs.items():
        identical(out / f"{disk}.qcow2", ref)


def test_failed_restore_removes_the_out_it_made_and_keeps_one_it_did_not(world: World, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(world.repo_dir, copy)
    for pack in (copy / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    out = tmp_path / "made" / "out"
    p = fleece("restore", "--repo", str(copy), "--vm", "hardvm", "--out", str(out))
    assert p.returncode == 1 and "missing" in error_line(p), p.stderr
    assert not (tmp_path / "made").exists(), list((tmp_path / "made").rglob("*"))
    mine = tmp_path / "mine"  # existed before: stays, even though empty
    mine.mkdir()
    p = fleece("restore", "--repo", str(copy), "--vm", "hardvm", "--out", str(mine), "--flat")
    assert p.returncode == 1, p.stderr
    assert mine.is_dir() and not list(mine.iterdir())


# -- 3. an --out that cannot work is a usage error, before any work -----------------------------------------

def test_empty_out_is_a_usage_error(world: World, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for extra in ([], ["--json"]):
        p = restore(world, "", *extra, cwd=cwd)
        assert p.returncode == 2, p.stderr
        assert "--out" in error_line(p) and "empty" in error_line(p)
    assert not list(cwd.iterdir())  # nothing restored into the current directory


def test_out_that_is_a_file_or_under_one_is_a_usage_error(world: World, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory")
    for out in (afile, afile / "sub"):
        p = restore(world, out, "--json")
        assert p.returncode == 2, p.stderr
        assert json.loads(p.stdout)["error"]["kind"] == "usage"
        assert f"--out {out} is not a directory" in error_line(p), p.stderr
    assert afile.read_bytes() == b"not a directory"


@pytest.fixture
def readonly_dir(tmp_path: Path, tmpfs) -> Path:
    """A directory restore cannot write: a read-only tmpfs (root ignores permission bits)."""
    d = tmpfs("1M")
    (d / "sub").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    return d


@pytest.mark.skipif(not is_root(), reason="mounting a read-only tmpfs needs root")
def test_readonly_out_is_a_usage_error_before_any_work(world: World, readonly_dir: Path) -> None:
    for out in (readonly_dir, readonly_dir / "sub", readonly_dir / "missing" / "deeper"):
        p = restore(world, out, "--json")
        assert p.returncode == 2, p.stderr
        assert json.loads(p.stdout)["error"]["kind"] == "usage"
        line = error_line(p)
        assert f"--out {out}" in line and "read-only" in line and "partial" not in line, line


@pytest.mark.skipif(is_root(), reason="root may write into any directory")
def test_unwritable_out_is_a_usage_error_before_any_work(world: World, tmp_path: Path) -> None:
    d = tmp_path / "locked"
    d.mkdir(mode=0o555)
    for out in (d, d / "missing"):
        p = restore(world, out)
        assert p.returncode == 2, p.stderr
        assert f"--out {out}" in error_line(p) and "not writable" in error_line(p)


# -- 4. a damaged index object: name it, and say how to repair ------------------------------------------------

def test_damaged_index_names_the_object_and_the_repair_command(world: World, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(world.repo_dir, copy)
    [index, *_] = sorted((copy / "index").iterdir())
    index.write_bytes(index.read_bytes()[:-7])  # truncated
    out = tmp_path / "out"
    p = fleece("restore", "--repo", str(copy), "--vm", "hardvm", "--out", str(out), "--json")
    assert p.returncode == 1, p.stderr
    line = error_line(p)
    assert f"index/{index.name}" in line and f"fleece rebuild-index --repo {copy}" in line, line
    assert json.loads(p.stdout)["error"]["object"] == f"index/{index.name}"
    assert not out.exists()
    # the advice works
    assert fleece("rebuild-index", "--repo", str(copy)).returncode == 0
    p = fleece("restore", "--repo", str(copy), "--vm", "hardvm", "--out", str(out))
    assert p.returncode == 0, p.stderr
    for disk, ref in world.refs.items():
        identical(out / f"{disk}.qcow2", ref)
    assert qemu_img("check", str(out / "vda.qcow2")).returncode == 0
