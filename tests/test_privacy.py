"""Disk images hold secrets: nothing fleece writes may be readable by other users, whatever the umask.

* the local repository: every file 0600 (temporary files too), every directory 0700; a repository an
  older fleece made with 0755/0644 keeps working and keeps its modes, new objects in it are private;
* a backup's run directory (0700) and its copy-before-write scratch images (0600), observed while the
  fleece is live; names planted in a shared ``--scratch`` by another user are neither followed, nor
  removed, nor able to break a backup, while a killed run's own leftovers still go;
* restored images: chain layers, the top image and flat images 0600 in 0700 directories, or exactly
  ``--mode`` (bad modes are usage errors);
* a failing S3 run prints neither the secret key it used nor the one of the access key, in any output mode.

Umasks 022 and 002 are set in this process (``os.umask``) or in the ``fleece`` subprocess (``Popen(umask=)``:
set by the C fork/exec path; a ``preexec_fn`` can deadlock the child of a threaded test process).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from checks import FLEECE, assert_point_matches, identical
from conftest import ODD_SIZE, MiB, is_root
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import RepoConfig, Repository, UsageError
from fleece.repository.backends import LocalBackend
from fleece.restore import RestoreRequest, run_restore
from test_backup import Recorder, seed
from vm import TestVM, random_bytes

NOBODY = 65534  # "another user" for planted files (chown needs root)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def run_fleece(*args: str, mask: int = 0o022, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed ``fleece`` command under umask *mask* (set in the child only)."""
    return subprocess.run([FLEECE, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          umask=mask)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def walk_modes(root: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    """(directories, files) under *root* (itself included) with their modes; symlinks count as files."""
    dirs, files = {root: mode(root)}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            dirs[Path(dirpath, d)] = mode(Path(dirpath, d))
        for f in filenames:
            files[Path(dirpath, f)] = mode(Path(dirpath, f))
    return dirs, files


def assert_private(root: Path, file_mode: int = 0o600, dir_mode: int = 0o700) -> None:
    dirs, files = walk_modes(root)
    assert files, f"nothing under {root}"
    wrong = {str(p): oct(m) for p, m in {**dirs, **files}.items()
             if m != (dir_mode if p in dirs else file_mode) and not Path(p).is_symlink()}
    assert not wrong, f"not {oct(file_mode)}/{oct(dir_mode)}: {wrong}"


@dataclass
class Observed:
    """What a hook saw of the run directory while the fleece was live."""

    run_dirs: list[tuple[str, int, int, bool]] = field(default_factory=list)  # (event, mode, uid, is_dir)
    images: list[tuple[str, str, int]] = field(default_factory=list)  # (event, name, mode)
    sockets: list[tuple[str, str]] = field(default_factory=list)  # (event, name)


class RunDirSpy(Recorder):
    """A :class:`Recorder` that also stats this process's run directory at "exported" and "pulled"."""

    def __init__(self, vm: TestVM, scratch: Path) -> None:
        super().__init__(vm)
        self.scratch = scratch
        self.seen = Observed()

    def __call__(self, name: str, data: dict) -> None:
        super().__call__(name, data)
        if name not in ("exported", "pulled"):
            return
        runs = list(self.scratch.glob(f"fleece-run-{os.getpid()}-*"))
        assert len(runs) == 1, runs
        st = os.lstat(runs[0])
        self.seen.run_dirs.append((name, stat.S_IMODE(st.st_mode), st.st_uid, stat.S_ISDIR(st.st_mode)))
        for entry in runs[0].iterdir():
            est = os.lstat(entry)
            if stat.S_ISSOCK(est.st_mode):
                self.seen.sockets.append((name, entry.name))
            else:
                self.seen.images.append((name, entry.name, stat.S_IMODE(est.st_mode)))


@dataclass
class World:
    vm: TestVM
    work: Path
    repo_dir: Path
    scratch: Path
    spies: dict[int, RunDirSpy]  # umask → what the in-process backup under it saw
    refs: dict[str, Path]  # ground truth of the last point


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One VM backed up four times into a fresh local repository: in this process under umask 022 (full),
    by the CLI under 022 and 002, in this process under 002; so restores have a chain of four layers."""
    work = tmp_path_factory.mktemp("privacy")
    vm = TestVM(work / "vm", {"vda": 32 * MiB, "vdb": ODD_SIZE})
    vm.start()
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        repo_dir = work / "repos" / "r1"  # the parent is missing too: made on demand
        spies = {}
        seed(vm)
        with umask(0o022):
            repo = Repository.open(str(repo_dir), create=True, config=RepoConfig(pack_target=MiB))
            spies[0o022] = RunDirSpy(vm, scratch)
            run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=spies[0o022]))
        for mask, seed_ in ((0o022, 11), (0o002, 12)):
            vm.write("vda", seed_ * 65536, random_bytes(3 * 65536, seed_))
            p = run_fleece("backup", "--qmp", vm.qmp_path, "--repo", str(repo_dir), "--scratch", str(scratch),
                           "--json", mask=mask)
            assert p.returncode == 0, p.stderr
        vm.write("vdb", ODD_SIZE - 4096, random_bytes(4096, 13))
        with umask(0o002):
            spies[0o002] = RunDirSpy(vm, scratch)
            run_backup(Repository.open(str(repo_dir)), BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                                                       on_event=spies[0o002]))
        yield World(vm, work, repo_dir, scratch, spies, spies[0o002].refs)
    finally:
        vm.cleanup()


# -- the local repository -----------------------------------------------------------------------------------

def test_repository_files_0600_dirs_0700(world: World) -> None:
    assert_private(world.repo_dir)
    assert mode(world.repo_dir.parent) == 0o700  # a missing parent of --repo, made by fleece
    names = {p.relative_to(world.repo_dir).parts[0] for p in walk_modes(world.repo_dir)[1]}
    assert {"config", "data", "index", "points"} <= names


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_local_backend_temp_files_and_new_dirs(tmp_path: Path, mask: int, monkeypatch) -> None:
    """Temporary files are private before their rename: each is looked at when the backend fsyncs it,
    the last moment before it is moved into place (nothing changes a file's mode after its creation)."""
    seen: list[int] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            seen.append(stat.S_IMODE(st.st_mode))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with umask(mask):
        b = LocalBackend(tmp_path / "repo", create=True)
        b.put("data/ab/pack1", os.urandom(3 * MiB))  # O_DIRECT path
        b.put_if_absent("points/vm/p1", b"manifest")  # small, page-cache path, create-if-absent
        b.put("config", b"{}")
    monkeypatch.undo()
    assert seen == [0o600] * 3, seen
    assert_private(tmp_path / "repo")


def test_older_repository_keeps_its_modes_and_gets_private_objects(tmp_path: Path) -> None:
    """A repository an older fleece made (0755 directories, 0644 files) is not chmodded behind the user's
    back, keeps working, and what is added to it is private."""
    root = tmp_path / "old"
    with umask(0o022):
        for d in (root, root / "data", root / "data" / "ab"):
            d.mkdir()
        (root / "data" / "ab" / "old-pack").write_bytes(b"old")
        b = LocalBackend(root, create=True)
        assert b.get("data/ab/old-pack") == b"old"
        b.put("data/ab/new-pack", b"new")
        b.put("data/cd/other-pack", b"new")
    assert [mode(d) for d in (root, root / "data", root / "data" / "ab")] == [0o755] * 3
    assert mode(root / "data" / "ab" / "old-pack") == 0o644
    assert mode(root / "data" / "ab" / "new-pack") == 0o600
    assert mode(root / "data" / "cd") == 0o700 and mode(root / "data" / "cd" / "other-pack") == 0o600


# -- the backup run directory and its scratch images --------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_run_dir_0700_and_scratch_images_0600_while_live(world: World, mask: int) -> None:
    seen = world.spies[mask].seen
    assert [e for e, *_ in seen.run_dirs] == ["exported", "pulled"]
    assert {(m, uid, is_dir) for _, m, uid, is_dir in seen.run_dirs} == {(0o700, os.geteuid(), True)}
    images = {(e, name) for e, name, _ in seen.images}
    assert len(images) == 4 and all(n.startswith("fleece-") and n.endswith(".qcow2") for _, n in images), images
    assert {m for *_, m in seen.images} == {0o600}, seen.images
    assert seen.sockets == [("exported", "nbd.sock"), ("pulled", "nbd.sock")]  # the NBD socket lives there too
    assert not list(world.scratch.glob("fleece-*")), "the run directory outlived its run"


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.skipif(not is_root(), reason="planting files of another user needs chown (root)")
def test_planted_names_in_scratch_are_not_followed_removed_or_fatal(make_vm, tmp_path: Path) -> None:
    vm = make_vm({"vda": 8 * MiB})
    vm.write("vda", 0, random_bytes(MiB, 21))
    scratch = tmp_path / "shared"
    scratch.mkdir()
    os.chmod(scratch, 0o1777)  # like /var/tmp
    dead = _dead_pid()
    victim = tmp_path / "victim"  # what planted symlinks point at: ours, looks like a run directory
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")

    def planted(name: str, make, foreign: bool = True) -> Path:
        p = scratch / name
        make(p)
        if foreign:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
        return p

    links = [planted(f"fleece-run-{dead}-link", lambda p: p.symlink_to(victim)),
             planted(f"fleece-run-{dead}-mylink", lambda p: p.symlink_to(victim), foreign=False),
             planted(f"fleece-run-{dead}-dangling", lambda p: p.symlink_to(tmp_path / "nowhere"))]
    foreign_dir = planted(f"fleece-run-{dead}-foreign", lambda p: p.mkdir(mode=0o777))
    inner = foreign_dir / "inner"
    inner.write_bytes(b"theirs")
    os.chown(inner, NOBODY, NOBODY)
    files = [planted(f"fleece-run-{dead}-file", lambda p: p.write_bytes(b"x")),
             planted(f"fleece-run-{dead}-myfile", lambda p: p.write_bytes(b"x"), foreign=False)]
    huge = planted("fleece-run-99999999999999999999999999-x", lambda p: p.mkdir(), foreign=False)  # no such pid
    mine = planted(f"fleece-run-{dead}-mine", lambda p: p.mkdir(mode=0o700), foreign=False)  # a killed run's
    (mine / "fleece-x.qcow2").write_bytes(b"old scratch")
    (mine / "sub").mkdir()
    (mine / "sub" / "link").symlink_to(victim)  # removing our leftover must not follow this either

    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with umask(0o002):
        spy = RunDirSpy(vm, scratch)
        result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=spy))
    assert result.manifest.kind == "full"
    assert {m for *_, m in spy.seen.images} == {0o600} and spy.seen.run_dirs[0][1] == 0o700

    assert not mine.exists(), "the killed run's own directory was not removed"
    for p in links:
        assert p.is_symlink()
    assert (victim / "precious").read_bytes() == b"keep me" and mode(victim) == 0o755
    assert sorted(os.listdir(victim)) == ["precious"]
    assert inner.read_bytes() == b"theirs" and os.lstat(foreign_dir).st_uid == NOBODY
    assert all(f.is_file() for f in files) and huge.is_dir()
    assert {p.name for p in scratch.iterdir()} == {p.name for p in [*links, foreign_dir, *files, huge]}


def test_sigkilled_backup_leaves_private_leftovers_that_the_next_run_removes(make_vm, tmp_path: Path) -> None:
    vm = make_vm({"vda": 80 * MiB})
    # More than the pipeline buffers (~40 MiB with 1 MiB packs), so the pull is still running, the fleece
    # exported, when the run is killed: with less, the pull can finish (and unwind) before the first poll.
    vm.write("vda", 0, random_bytes(64 * MiB, 31))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    repo = str(tmp_path / "repo")
    Repository.open(repo, create=True, config=RepoConfig(pack_target=MiB)).close()
    slow = subprocess.Popen([FLEECE, "backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch),
                             "--bwlimit", "64K"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            umask=0o002)
    try:
        deadline = time.monotonic() + 30
        while not vm.guest.cmd("query-block-exports"):
            assert slow.poll() is None, slow.stderr.read()
            if time.monotonic() > deadline:
                slow.kill()
                raise AssertionError(f"the backup never exported its fleece: {slow.communicate()[1]!r}")
            time.sleep(0.05)
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.wait()
    [left] = scratch.glob(f"fleece-run-{slow.pid}-*")
    assert mode(left) == 0o700
    images = [p for p in left.iterdir() if p.suffix == ".qcow2"]
    assert images and {mode(p) for p in images} == {0o600}
    assert stat.S_ISSOCK(os.lstat(left / "nbd.sock").st_mode)

    rec = Recorder(vm)
    result = run_backup(Repository.open(repo), BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec))
    assert result.manifest.kind == "full"
    assert not list(scratch.iterdir()), "the killed run's directory was not removed"


# -- restored images ----------------------------------------------------------------------------------------

def _check_chain(out: Path, world: World, file_mode: int, dir_mode: int) -> None:
    for disk in ("vda", "vdb"):
        layers = sorted((out / disk).iterdir())
        assert len(layers) == 4, layers
        assert mode(out / disk) == dir_mode
        assert {mode(p) for p in layers} == {file_mode}
        assert mode(out / f"{disk}.qcow2") == file_mode
        identical(out / f"{disk}.qcow2", world.refs[disk])


def test_restore_chain_cli_umask_022(world: World) -> None:
    out = world.work / "restore-cli" / "nested" / "out"  # every missing directory is made private
    p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(out), "--json",
                   mask=0o022)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["mode"] == "chain"
    _check_chain(out, world, 0o600, 0o700)
    assert [mode(d) for d in (out, out.parent, out.parent.parent)] == [0o700] * 3
    assert_private(out)


def test_restore_chain_api_umask_002(world: World) -> None:
    out = world.work / "restore-api"
    with umask(0o002):
        run_restore(Repository.open(str(world.repo_dir)), RestoreRequest(vm="testvm", out=out, workers=2))
    _check_chain(out, world, 0o600, 0o700)
    assert_private(out)


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_flat_is_private(world: World, fmt: str, mask: int) -> None:
    out = world.work / f"flat-{fmt}-{mask:o}"
    p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(out), "--flat",
                   "--format", fmt, mask=mask)
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in out.iterdir()) == [f"vda.{fmt}", f"vdb.{fmt}"]
    assert_private(out)
    identical(out / f"vdb.{fmt}", world.refs["vdb"], fmt)


def test_restore_mode_0640_is_exact_and_bad_modes_are_usage_errors(world: World) -> None:
    existing = world.work / "shared-out"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    # umask 077 would take the group bits away: --mode is exact all the same
    p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(existing),
                   "--mode", "0640", mask=0o077)
    assert p.returncode == 0, p.stderr
    _check_chain(existing, world, 0o640, 0o750)
    assert mode(existing) == 0o755, "an existing --out directory was chmodded"
    flat = world.work / "flat-0640"
    p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(flat), "--flat",
                   "--format", "raw", "--mode", "640", mask=0o022)
    assert p.returncode == 0, p.stderr
    assert_private(flat, 0o640, 0o750)

    for bad in ("0755", "0400", "abc", "9", "07777", "-600", "0o1640", ""):
        out = world.work / f"bad-{secrets.token_hex(3)}"
        for extra in ([], ["--json"]):
            p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(out),
                           "--mode", bad, *extra)
            assert p.returncode == 2, (bad, p.stdout, p.stderr)
            assert "--mode" in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert not out.exists()
    with pytest.raises(UsageError):
        run_restore(Repository.open(str(world.repo_dir)),
                    RestoreRequest(vm="testvm", out=world.work / "bad-api", mode=0o4600))
    assert not (world.work / "bad-api").exists()


@pytest.mark.skipif(not is_root(), reason="a directory of another group needs chown (root)")
def test_restore_into_setgid_out_keeps_the_group_but_grants_it_nothing(world: World) -> None:
    """The documented choice (restore/restore.py): the kernel gives a setgid --out's group to what restore
    makes in it, but without --mode that group gets no permission."""
    out = world.work / "setgid-out"
    out.mkdir()
    os.chown(out, -1, NOBODY)
    os.chmod(out, 0o2775)
    p = run_fleece("restore", "--repo", str(world.repo_dir), "--vm", "testvm", "--out", str(out), "--disk", "vda",
                   mask=0o002)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.lstat(out / "vda").st_mode) == 0o2700  # setgid inherited, group bits not
    for f in [out / "vda.qcow2", *(out / "vda").iterdir()]:
        assert mode(f) == 0o600 and os.lstat(f).st_gid == NOBODY


# -- S3: secrets never reach the output ---------------------------------------------------------------------

OUTPUT_MODES = ([], ["--json"], ["-v"], ["-v", "-v", "--json"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(args: list[str], env: dict[str, str]) -> list[str]:
    """stdout + stderr of a failing ``fleece`` run, in every output mode."""
    texts = []
    for extra in OUTPUT_MODES:
        p = run_fleece(*args, *extra, env=env, timeout=120)
        assert p.returncode == 1, (args, extra, p.stdout, p.stderr)
        assert "fleece: error:" in p.stderr and "Traceback" not in p.stderr, p.stderr
        if "--json" in extra:
            assert json.loads(p.stdout)["error"]["kind"]
        texts.append(p.stdout + p.stderr)
    return texts


@pytest.mark.s3
def test_failing_s3_runs_never_print_the_secret_keys(rgw: dict, world: World) -> None:
    real_secret = rgw["secret_key"]
    wrong_secret = secrets.token_urlsafe(30)
    base = {**os.environ, "FLEECE_S3_ATTEMPTS": "2"}
    s3_bucket = "fleece-privacy"
    p = run_fleece("init", "--repo", f"s3://{s3_bucket}/made", "--create-bucket", env=base)
    assert p.returncode == 0, p.stderr
    repo = f"s3://{s3_bucket}/{secrets.token_hex(6)}"
    out = str(world.work / "s3-out")
    commands = [["init", "--repo", repo], ["list", "--repo", repo], ["verify", "--repo", repo, "--read-data"],
                ["restore", "--repo", repo, "--vm", "testvm", "--out", out],
                ["backup", "--qmp", world.vm.qmp_path, "--repo", repo, "--scratch", str(world.scratch)]]
    scenarios = {  # name → (environment, the secrets that must not appear)
        "wrong secret key": ({**base, "AWS_SECRET_ACCESS_KEY": wrong_secret}, [wrong_secret, real_secret]),
        "unknown access key": ({**base, "AWS_ACCESS_KEY_ID": "FLEECE" + secrets.token_hex(6)}, [real_secret]),
        "unreachable endpoint": ({**base, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_free_port()}"},
                                 [real_secret]),
        "no such bucket": (base, [real_secret]),
    }
    for name, (env, hidden) in scenarios.items():
        runs = commands if name == "wrong secret key" else commands[1:2] + commands[-1:]
        if name == "no such bucket":
            runs = [[a.replace(s3_bucket, f"nobucket-{secrets.token_hex(4)}") for a in cmd] for cmd in runs]
        for cmd in runs:
            for text in _outputs(cmd, env):
                for secret in hidden:
                    assert secret not in text, f"{name}: {cmd[0]} printed a secret key:\n{text}"
                    assert secret[:16] not in text, f"{name}: {cmd[0]} printed part of a secret key:\n{text}"

    # The check sees what the runs print: the same secret, made part of the repository's name, is found.
    env, _ = scenarios["wrong secret key"]
    assert all(wrong_secret in text for text in _outputs(["list", "--repo", f"s3://{s3_bucket}/{wrong_secret}"], env))
    assert not (world.work / "s3-out").exists()


# -- QEMU as another user ------------------------------------------------------------------------------------


@pytest.mark.skipif(not is_root(), reason="QEMU -runas and the hand-over need root")
def test_qemu_running_as_another_user_gets_its_own_private_run_directory(tmp_path: Path) -> None:
    """QEMU started by root that dropped to ``nobody`` (``-runas``) must open fleece's scratch images and
    create the NBD socket: it gets a 0700 ``qemu`` subdirectory of its own for the socket in a 0711 run
    directory, which holds the scratch images (0600, chowned to it: it cannot swap them, the directory is
    root's), nobody else can read any of it, and the points are exact — the guest writing, zeroing
    (WRITE_ZEROES and a zero-filled write on a detect-zeroes disk) and discarding right after the point. A ``--scratch`` it
    cannot traverse is a usage error that touches nothing: the next incremental is still exact."""
    base = Path(tempfile.mkdtemp(prefix="flr-", dir="/var/tmp"))
    base.chmod(0o711)
    # vdb as Proxmox sets it up: discards unmap, zero-filled writes become WRITE_ZEROES
    vm = TestVM(base / "vm", {"vda": 32 * MiB, "vdb": ODD_SIZE},
                node_opts={"vda": "discard=unmap", "vdb": "detect-zeroes=unmap,discard=unmap"})
    vm.dir.chmod(0o711)
    vm._tmp.chmod(0o711)  # qemu-io -s: QEMU, as nobody, reads the guest's write data from a file there
    vm.extra_args += ["-runas", "nobody"]
    vm.start()
    try:
        scratch = base / "s"
        scratch.mkdir(mode=0o711)
        scratch.chmod(0o711)
        with open(f"/proc/{vm.proc.pid}/status") as f:
            assert f"Uid:\t{NOBODY}" in f.read(), "QEMU did not drop to nobody"
        seed(vm)
        repo = Repository.open(str(tmp_path / "repo"), create=True)
        seen: dict[str, object] = {}
        def guest_after_the_point() -> None:  # none of it may appear in the point
            vm.write("vda", MiB, random_bytes(MiB, 77))
            vm.zero("vda", 4 * MiB - 4096, 8192)  # WRITE_ZEROES over seeded data
            vm.discard("vdb", 5 * MiB, MiB)
            vm.zero_data("vdb", 7 * MiB, MiB)  # zero-filled write on the detect-zeroes disk

        rec = Recorder(vm, after_freeze=guest_after_the_point)

        def on_event(name: str, data: dict) -> None:
            rec(name, data)
            if name == "exported":
                [run] = list(scratch.iterdir())
                sub = run / "qemu"
                seen["run"] = (run.stat().st_uid, mode(run))
                seen["sub"] = (sub.stat().st_uid, mode(sub))
                seen["files"] = {p.name: (p.stat().st_uid, mode(p)) for p in run.iterdir() if p != sub}
                seen["sub_files"] = sorted(p.name for p in sub.iterdir())

        r = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=on_event))
        assert seen["run"] == (0, 0o711) and seen["sub"] == (NOBODY, 0o700), seen
        files = seen["files"]
        assert seen["sub_files"] == ["nbd.sock"], seen  # QEMU's own directory: only what QEMU creates
        images = {n: v for n, v in files.items() if n.endswith(".qcow2")}  # in root's: no swapping them
        assert len(images) == 2 == len(files) and set(images.values()) == {(NOBODY, 0o600)}, files
        assert_point_matches(repo, r.manifest, rec.refs)
        assert not list(scratch.iterdir())

        hidden = base / "private"
        hidden.mkdir(mode=0o700)
        hidden.chmod(0o700)
        p = run_fleece("backup", "--qmp", vm.qmp_path, "--repo", repo.url, "--scratch", str(hidden))
        assert p.returncode == 2 and f"as uid {NOBODY}" in p.stderr and str(hidden) in p.stderr, p.stderr
        assert not list(hidden.iterdir())

        vm.write("vdb", 2 * MiB, random_bytes(MiB, 78))
        rec2 = Recorder(vm)
        r2 = run_backup(Repository.open(repo.url), BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                                                 on_event=rec2))
        assert r2.manifest.kind == "incremental" and r2.manifest.parent == r.manifest.id
        assert_point_matches(repo, r2.manifest, rec2.refs)
    finally:
        vm.cleanup()
        subprocess.run(["rm", "-rf", str(base)], check=False)
