"""Every command, driven with bad arguments, bad paths and damaged repositories, as a script would.

For each case, with and without ``--json``: the documented exit code (2 usage, 1 failure), exactly one
``fleece: error:`` line on stderr and no traceback, with ``--json`` exactly one JSON document on stdout
(``{"error": {"kind", "message", "exit"}}`` whose ``exit`` is the exit code), and afterwards nothing
changed — not one byte or mode of the repository, not one bitmap, node or export of the VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from checks import FLEECE, children, comm, fleece
from conftest import MiB, is_root
from vm import TestVM, random_bytes


def snapshot_tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry below *root*: content hash (files) and mode — what "nothing changed" means."""
    out: dict[str, tuple[str, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(p.relative_to(root))] = (digest, st.st_mode)
    return out


def vm_state(vm: TestVM) -> object:
    mon = vm.guest
    assert mon is not None
    nodes = sorted((n["node-name"], sorted((b.get("name", ""), b["recording"], b["count"])
                                           for b in n.get("dirty-bitmaps", [])))
                   for n in mon.cmd("query-named-block-nodes", {"flat": True}))
    return nodes, mon.cmd("query-block-exports"), mon.cmd("query-status")["status"]


class Env:
    """One VM with one backup, a good repository and damaged copies of it, shared by every case."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.vm = TestVM(base / "vm", {"vda": 8 * MiB, "vdb": 4 * MiB}, name="fuzzvm")
        self.vm.start()
        self.vm.write("vda", 0, random_bytes(MiB, 1))
        self.vm.write("vdb", MiB, random_bytes(MiB, 2))
        self.scratch = base / "scratch"
        self.scratch.mkdir()
        self.repo = base / "repo"
        p = fleece("backup", "--qmp", self.vm.qmp_path, "--repo", str(self.repo), "--scratch", str(self.scratch))
        assert p.returncode == 0, p.stderr
        self.point = json.loads(fleece("list", "--repo", str(self.repo), "--json").stdout)["points"][0]["id"]
        self.vm.write("vda", 2 * MiB, b"\x55" * 65536)  # an incremental would have something to do
        self.out = base / "out"
        self.regular = base / "regular-file"
        self.regular.write_text("not a socket, not a repository\n")
        self.stale = base / "stale.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(self.stale))
        s.close()
        self.damaged = {what: self._damage(what) for what in ("config", "manifest", "index", "pack")}

    def _damage(self, what: str) -> Path:
        copy = self.base / f"repo-bad-{what}"
        shutil.copytree(self.repo, copy)
        if what == "config":
            target = copy / "config"
        else:
            folder = {"manifest": "points", "index": "index", "pack": "data"}[what]
            target = max((p for p in (copy / folder).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        if what == "pack":
            data[len(data) // 2] ^= 0xFF  # a flipped bit in a blob's payload
        else:
            data = data[: len(data) // 2]  # cut short
        os.chmod(target, 0o600)
        target.write_bytes(bytes(data))
        return copy

    def close(self) -> None:
        self.vm.cleanup()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    e = Env(tmp_path_factory.mktemp("fuzz"))
    yield e
    e.close()


def R(e: Env) -> list[str]:
    return ["--repo", str(e.repo)]


def B(e: Env, *extra: str) -> list[str]:
    return ["backup", "--qmp", e.vm.qmp_path, "--repo", str(e.repo), "--scratch", str(e.scratch), *extra]


def O(e: Env) -> list[str]:
    return ["--out", str(e.out)]


#: A command that ran and found damage: exit 1, its report (not an error document) is the one JSON document.
REPORT = -1

# (name, argv builder, expected exit). Every case must leave the repository and the VM untouched.
CASES = [
    ("no command", lambda e: [], 2),
    ("unknown command", lambda e: ["frobnicate"], 2),
    ("unknown flag", lambda e: ["list", *R(e), "--frobnicate"], 2),
    # backup: bad values, caught before any work
    ("backup without --qmp", lambda e: ["backup", *R(e)], 2),
    ("backup --vm ..", lambda e: B(e, "--vm", ".."), 2),
    ("backup --vm empty", lambda e: B(e, "--vm", ""), 2),
    ("backup --vm control char", lambda e: B(e, "--vm", "a\nb"), 2),
    ("backup --vm too long", lambda e: B(e, "--vm", "v" * 300), 2),
    ("backup --workers 0", lambda e: B(e, "--workers", "0"), 2),
    ("backup --workers 65", lambda e: B(e, "--workers", "65"), 2),
    ("backup --workers abc", lambda e: B(e, "--workers", "abc"), 2),
    ("backup --bwlimit fast", lambda e: B(e, "--bwlimit", "fast"), 2),
    ("backup --bwlimit 0", lambda e: B(e, "--bwlimit", "0"), 2),
    ("backup --audit-sample -1", lambda e: B(e, "--audit-sample", "-1"), 2),
    ("backup --disk unknown", lambda e: B(e, "--disk", "nosuch"), 2),
    ("backup --scratch missing", lambda e: B(e)[:-1] + [str(e.base / "no-such-dir")], 2),
    ("backup --scratch is a file", lambda e: B(e)[:-1] + [str(e.regular)], 2),
    ("backup --s3-endpoint not a url", lambda e: B(e, "--s3-endpoint", "not a url"), 2),
    ("backup --s3-endpoint bad port", lambda e: B(e, "--s3-endpoint", "http://127.0.0.1:99999"), 2),
    # backup: bad places
    ("backup --qmp empty", lambda e: ["backup", "--qmp", "", *R(e)], 2),
    ("backup --qmp /dev/null", lambda e: ["backup", "--qmp", "/dev/null", *R(e)], 1),
    ("backup --workers 1_0", lambda e: B(e, "--workers", "1_0"), 2),
    ("list --repo file://", lambda e: ["list", "--repo", "file://"], 2),
    ("backup --qmp missing", lambda e: ["backup", "--qmp", str(e.base / "nope.sock"), *R(e)], 1),
    ("backup --qmp regular file", lambda e: ["backup", "--qmp", str(e.regular), *R(e)], 1),
    ("backup --qmp directory", lambda e: ["backup", "--qmp", str(e.base), *R(e)], 1),
    ("backup --qmp stale socket", lambda e: ["backup", "--qmp", str(e.stale), *R(e)], 1),
    ("backup --repo is a file", lambda e: B(e)[:3] + ["--repo", str(e.regular)], 2),
    ("backup --repo ftp://", lambda e: B(e)[:3] + ["--repo", "ftp://host/x"], 2),
    ("backup into a damaged config", lambda e: B(e)[:3] + ["--repo", str(e.damaged["config"])], 1),
    # list / verify / rebuild-index / init
    ("list missing repo", lambda e: ["list", "--repo", str(e.base / "nothing")], 1),
    ("list repo is a file", lambda e: ["list", "--repo", str(e.regular)], 2),
    ("list --vm ..", lambda e: ["list", *R(e), "--vm", ".."], 2),
    ("list damaged config", lambda e: ["list", "--repo", str(e.damaged["config"])], 1),
    ("list damaged manifest", lambda e: ["list", "--repo", str(e.damaged["manifest"])], REPORT),
    ("verify --point without --vm", lambda e: ["verify", *R(e), "--point", "x"], 2),
    ("verify --workers 1000", lambda e: ["verify", *R(e), "--workers", "1000"], 2),
    ("verify damaged index", lambda e: ["verify", "--repo", str(e.damaged["index"])], REPORT),
    ("verify damaged pack", lambda e: ["verify", "--repo", str(e.damaged["pack"]), "--read-data"], REPORT),
    ("verify damaged manifest", lambda e: ["verify", "--repo", str(e.damaged["manifest"])], REPORT),
    ("rebuild-index missing repo", lambda e: ["rebuild-index", "--repo", str(e.base / "nothing")], 1),
    ("init --compression-level 99", lambda e: ["init", "--repo", str(e.base / "new"), "--compression-level", "99"], 2),
    ("init repo is a file", lambda e: ["init", "--repo", str(e.regular)], 2),
    # restore
    ("restore without --out", lambda e: ["restore", *R(e), "--vm", "fuzzvm"], 2),
    ("restore unknown vm", lambda e: ["restore", *R(e), "--vm", "nosuchvm", *O(e)], 1),
    ("restore unknown point", lambda e: ["restore", *R(e), "--vm", "fuzzvm", "--point", "19990101", *O(e)], 1),
    ("restore unknown disk", lambda e: ["restore", *R(e), "--vm", "fuzzvm", "--disk", "nosuch", *O(e)], 2),
    ("restore --out is a file", lambda e: ["restore", *R(e), "--vm", "fuzzvm", "--out", str(e.regular)], 2),
    ("restore --format vmdk", lambda e: ["restore", *R(e), "--vm", "fuzzvm", *O(e), "--flat", "--format", "vmdk"], 2),
    ("restore --workers 0", lambda e: ["restore", *R(e), "--vm", "fuzzvm", *O(e), "--workers", "0"], 2),
    ("restore damaged index", lambda e: ["restore", "--repo", str(e.damaged["index"]), "--vm", "fuzzvm", *O(e)], 1),
    ("restore damaged pack", lambda e: ["restore", "--repo", str(e.damaged["pack"]), "--vm", "fuzzvm", *O(e)], 1),
]


def check_report(p: subprocess.CompletedProcess[str], as_json: bool) -> None:
    """Damage found and reported: exit 1, no traceback, the report says DAMAGED (JSON: one document)."""
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, (p.returncode, p.stderr)
    if as_json:
        doc = json.loads(p.stdout)
        assert doc.get("ok") is False or doc.get("damaged"), doc
    else:
        assert "DAMAGED" in p.stdout, p.stdout


def check_failure(p: subprocess.CompletedProcess[str], expected: int, as_json: bool) -> dict:
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(errors) == 1, p.stderr
    assert p.returncode == expected, (p.returncode, p.stderr)
    if not as_json:
        assert p.stdout == "", p.stdout
        return {}
    doc = json.loads(p.stdout)  # exactly one document: json.loads refuses trailing data
    err = doc["error"]
    assert set(err) >= {"kind", "message", "exit"} and err["exit"] == expected, doc
    assert "\n" not in err["message"] and err["message"] in errors[0], (err, errors)
    return err


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(env: Env, name: str, argv, expected: int) -> None:
    args = argv(env)
    repos = [env.repo, *env.damaged.values()]
    before = {r: snapshot_tree(r) for r in repos}
    vm_before = vm_state(env.vm)
    for as_json in (False, True):
        p = fleece(*args, *(["--json"] if as_json else []), timeout=120)
        if expected == REPORT:
            check_report(p, as_json)
        else:
            check_failure(p, expected, as_json)
    assert {r: snapshot_tree(r) for r in repos} == before, f"{name} changed a repository"
    assert vm_state(env.vm) == vm_before, f"{name} changed the VM"
    for leftover in (env.base / "new", env.base / "nothing"):
        assert not leftover.exists(), f"{name} created {leftover}"
    if env.out.exists():
        assert not any(env.out.rglob("*.qcow2")), f"{name} left images in --out"


def test_failed_backup_does_not_create_the_repository(env: Env) -> None:
    """A backup that fails (here: the disk is unknown, found only after QEMU was asked) leaves no --repo."""
    fresh = env.base / "fresh-repo"
    p = fleece("backup", "--qmp", env.vm.qmp_path, "--repo", str(fresh), "--scratch", str(env.scratch),
               "--disk", "nosuch", "--json")
    check_failure(p, 2, True)
    assert not fresh.exists()


def test_silent_qmp_socket_times_out_with_a_message(env: Env) -> None:
    """A socket that accepts but never greets (a busy -qmp, or not QMP at all): one line, no library noise."""
    path = env.base / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        p = fleece("backup", "--qmp", str(path), *R(env), "--json", timeout=120)
        err = check_failure(p, 1, True)
        assert err["kind"] == "qmp-connect" and "greeting" in err["message"]
        assert "bug" not in p.stderr and "Task was destroyed" not in p.stderr, p.stderr
    finally:
        stop.set()
        t.join()
        srv.close()
        for c in held:
            c.close()


@pytest.mark.skipif(not is_root(), reason="mounting a read-only tmpfs needs root")
def test_read_only_scratch_is_a_usage_error(env: Env, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        vm_before = vm_state(env.vm)
        p = fleece(*B(env)[:-1], str(ro), "--json")
        err = check_failure(p, 2, True)
        assert "writable" in err["message"] and str(ro) in err["message"]
        assert vm_state(env.vm) == vm_before
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def fleece_argv(*args: str) -> list[str]:
    return [FLEECE, *args]


def test_ctrl_c_during_restore(make_vm, tmp_path: Path, scratch: Path) -> None:
    """Ctrl-C reaches the whole foreground process group. The restore must stop with one line (no
    ``nbd_flush … CLOSED`` traceback from a qemu-nbd that died with it), leave no qemu-nbd behind and no
    image in --out that could pass for a restored disk."""
    vm = make_vm({"vda": 96 * MiB})
    for i in range(6):
        vm.write("vda", i * 16 * MiB, random_bytes(16 * MiB, 10 + i))
    repo = str(tmp_path / "repo")
    assert fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch)).returncode == 0
    out = tmp_path / "out"
    import signal
    import time

    proc = subprocess.Popen([*fleece_argv("restore", "--repo", repo, "--vm", "testvm", "--out", str(out),
                                          "--workers", "1", "--json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    nbd_pid = None  # the base is written directly (no qemu-nbd): wait for its image to be in the making
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob(".vda.partial/*.qcow2")):
        nbd_pid = nbd_pid or next((c for c in children(proc.pid) if comm(c) == "qemu-nbd"), None)
        time.sleep(0.002)
    assert proc.poll() is None, "the restore finished before its image was begun: make the disk bigger"
    time.sleep(0.05)  # inside the fill
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    stdout, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "CLOSED" not in stderr, stderr
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert json.loads(stdout)["error"]["kind"] == "interrupted", stdout
    assert [ln for ln in stderr.splitlines() if ln.startswith("fleece: error:")] == \
        ["fleece: error: interrupted; no image was put in place: run the same restore with --resume to continue "
         "it (its partial images are kept in --out), or without to start over"], stderr
    time.sleep(0.2)
    assert nbd_pid is None or not Path(f"/proc/{nbd_pid}").exists() or comm(nbd_pid) != "qemu-nbd", \
        "qemu-nbd left running"
    assert not [c for c in children(proc.pid) if comm(c) == "qemu-nbd"]
    # nothing that could pass for a restored disk: only hidden partial images and their journals
    assert all(p.name.startswith(".") for p in out.iterdir()) if out.exists() else True, list(out.rglob("*"))


def test_ambiguous_point_prefix_is_a_usage_error(env: Env) -> None:
    """A prefix that starts several point ids names none of them: say so and list them (exit 2)."""
    p = fleece(*B(env, "--json"))
    assert p.returncode == 0, p.stderr
    second = json.loads(p.stdout)["id"]
    common = os.path.commonprefix([env.point, second])
    assert common, (env.point, second)
    for argv in (["restore", *R(env), "--vm", "fuzzvm", "--point", common, *O(env)],
                 ["verify", *R(env), "--vm", "fuzzvm", "--point", common]):
        err = check_failure(fleece(*argv, "--json"), 2, True)
        assert "ambiguous" in err["message"] and env.point in err["message"] and second in err["message"]


def test_relative_scratch_works(env: Env) -> None:
    """QEMU opens the fleece target from its own working directory: a relative --scratch must still work."""
    p = subprocess.run([FLEECE, "backup", "--qmp", env.vm.qmp_path, "--repo", str(env.repo), "--scratch",
                        "scratch", "--json"], capture_output=True, text=True, cwd=env.base, timeout=300)
    assert p.returncode == 0, p.stderr


def test_closed_or_full_stdout_is_one_line(env: Env) -> None:
    for argv, stdout in ((["list", *R(env), "--json"], "closed"), (["list", *R(env), "--json"], "/dev/full"),
                         (["list", "--repo", str(env.base / "nothing"), "--json"], "/dev/full")):
        if stdout == "closed":
            # the shell closes fd 1 and execs fleece (a preexec_fn could deadlock a threaded pytest's child)
            p = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', FLEECE, *argv], stderr=subprocess.PIPE,
                               text=True, timeout=60)
        else:
            with open(stdout, "w") as full:
                p = subprocess.run([FLEECE, *argv], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        assert "Traceback" not in p.stderr, p.stderr
        assert p.returncode == 1 and len([ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]) == 1, \
            p.stderr


def test_impatient_ctrl_c_leaves_the_vm_as_it_was(make_vm, tmp_path: Path, scratch: Path) -> None:
    """Ctrl-C, then Ctrl-C again and again while the run unwinds: the graph teardown and the bitmap
    fold-back are shielded, so the VM ends exactly as before (no fleece node, export or extra bitmap)."""
    import signal
    import time

    from checks import assert_clean, fleece_bitmaps

    vm = make_vm({"vda": 96 * MiB})
    repo = str(tmp_path / "repo")
    assert fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch)).returncode == 0
    for i in range(6):
        vm.write("vda", i * 16 * MiB, random_bytes(16 * MiB, 30 + i))
    before = fleece_bitmaps(vm.guest)
    proc = subprocess.Popen([FLEECE, "backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch),
                             "--workers", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(n["node-name"].startswith("fleece-") for n in vm.guest.cmd("query-named-block-nodes", {"flat": True})):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the backup ended before its fleece was seen"
    time.sleep(0.1)
    end = time.monotonic() + 2
    while time.monotonic() < end and proc.poll() is None:  # a user hammering Ctrl-C through the unwind
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.004)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert json.loads(stdout)["error"]["kind"] == "interrupted"
    assert_clean(vm.guest)
    assert fleece_bitmaps(vm.guest) == before
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["kind"] == "incremental", p.stderr
