"""``fleece serve``: a point's disks as NBD exports from the repository alone, read by real clients.

One module-scoped history (a real QEMU, a full and an incremental with writes, zeroes and discards in
between, through the CLI) is served by the real command — nbdkit running the package's plugin — and read
with libnbd, ``qemu-img`` and ``nbdcopy``: every byte compared with the ground truth, block status checked
against it, the writable overlay shown to reach nothing, damage shown to reach the client as EIO.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest

from checks import FLEECE, children, fleece, identical, ok, qemu_img
from conftest import ODD_SIZE, MiB
from fleece.repository import Repository
from fleece.repository.pack import pack_name
from fleece.restore.reader import EXTENT_DATA, EXTENT_HOLE_ZERO, PointReader
from vm import TestVM, random_bytes, text_bytes

VDA = 40 * MiB


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):
    """A repository with a full and an incremental of a 2-disk VM; the truth of the incremental."""
    d = tmp_path_factory.mktemp("serve")
    vm = TestVM(d / "vm", {"vda": VDA, "vdb": ODD_SIZE}, name="servevm", node_opts={"vdb": "discard=unmap"})
    vm.start()
    try:
        scratch = d / "scratch"
        scratch.mkdir()
        repo = str(d / "repo")
        vm.write("vda", 0, text_bytes(MiB, 1))
        vm.write("vda", 4 * MiB - 4096, random_bytes(8192, 2))
        vm.write("vda", 9 * MiB, random_bytes(6 * MiB, 3))  # spans grid cells: several blobs
        vm.write("vda", VDA - 65536, random_bytes(65536, 4))
        vm.write("vdb", 5 * MiB, random_bytes(3 * MiB, 5))
        vm.write("vdb", ODD_SIZE - 512, b"\xee" * 512)
        full = ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json"))
        vm.write("vda", 10 * MiB + 4096, random_bytes(100_000, 6))  # inside an older blob: pieces with skip
        vm.zero("vda", 12 * MiB, MiB)  # a zeroed range inside old data: must read back as zeros
        vm.discard("vdb", 6 * MiB, MiB)
        vm.write("vda", 30 * MiB, random_bytes(MiB, 7))
        inc = ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json"))
        refs = vm.snapshot_refs("inc")
    finally:
        vm.quit()
    assert inc["kind"] == "incremental"
    return {"repo": repo, "full": full["id"], "inc": inc["id"], "refs": refs, "dir": d}


class Served:
    """A running ``fleece serve`` (its JSON document read: it is ready)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([FLEECE, "serve", "--json", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited {self.proc.wait()}: {self.proc.stderr.read()}")
        self.doc = json.loads(line)
        self.stderr = ""

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status. Its stderr must reach EOF too: a child
        still holding it open (an nbdkit left running) fails here, not as a hang."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,cmd"], capture_output=True, text=True).stdout
            raise AssertionError(f"fleece serve (exit {self.proc.poll()}) left its stderr open:\n{ps}") from None
        return self.proc.returncode

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alive(pid: int) -> bool:
    """A process that still runs: a zombie waiting for this machine's init to reap it does not."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h: nbd.NBD, size: int) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size:
        def got(meta: str, offset: int, entries: list[int], err: int) -> int:
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                at = offset
                for i in range(0, len(entries), 2):
                    runs.append((at, entries[i], entries[i + 1]))
                    at += entries[i]
            return 0
        h.block_status(min(size - pos, 1 << 30), pos, got)
        pos = runs[-1][0] + runs[-1][1]
    return runs


def test_serve_reads_every_byte_of_the_point(history, tmp_path) -> None:
    sock = tmp_path / "nbd.sock"
    with Served(["--repo", history["repo"], "--vm", "servevm", "--socket", str(sock)]) as s:
        assert s.doc["point"] == history["inc"] and s.doc["default"] is None  # two disks: no default export
        assert set(s.doc["exports"]) == {"vda", "vdb"}
        assert sock.stat().st_mode & 0o077 == 0, "whoever can connect reads the disk: the socket is private"
        pid = s.doc["pid"]
        assert pid in children(s.proc.pid)
        for disk, ref in history["refs"].items():
            identical(s.doc["exports"][disk], ref, fmt="raw")  # qemu-img compare over NBD
            out = tmp_path / f"{disk}.raw"
            subprocess.run(["nbdcopy", "--connections=4", s.doc["exports"][disk], str(out)], check=True)
            assert out.read_bytes() == ref.read_bytes()
        # block status: holes only where the truth is zero, data everywhere the truth is not
        h = connect(s.doc["exports"]["vda"])
        assert h.get_size() == VDA and h.is_read_only() and h.can_multi_conn()
        truth = history["refs"]["vda"].read_bytes()
        runs = block_status(h, VDA)
        assert sum(n for _, n, _ in runs) == VDA
        for off, n, flags in runs:
            if flags & (nbd.STATE_HOLE | nbd.STATE_ZERO) == nbd.STATE_HOLE | nbd.STATE_ZERO:
                assert truth[off:off + n].count(0) == n, f"a hole at {off}+{n} holds data"
        zeros = [(o, n) for o, n, f in runs if f & nbd.STATE_ZERO]
        assert sum(n for _, n in zeros) > VDA // 2, "the unwritten part of the disk is reported as holes"
        assert any(o <= 12 * MiB and o + n >= 13 * MiB for o, n in zeros), "the zeroed MiB is a zero extent"
        h.shutdown()
        assert s.stop() == 0, s.stderr
    assert not sock.exists(), "the socket is removed when the server stops"
    assert not alive(pid), "nbdkit is gone with the server"
    assert not any(p.name.startswith(f"fleece-serve-{s.proc.pid}-") for p in Path(os.environ.get("TMPDIR", "/tmp")).iterdir())


def test_one_disk_is_the_default_export_and_an_old_point_serves_too(history, tmp_path) -> None:
    sock = tmp_path / "s"
    with Served(["--repo", history["repo"], "--vm", "servevm", "--disk", "vdb", "--point", history["full"],
                 "--socket", str(sock)]) as s:
        assert s.doc["default_disk"] == "vdb" and s.doc["point"] == history["full"]
        info = json.loads(qemu_img("info", "--output=json", f"nbd+unix:///?socket={sock}").stdout)
        assert info["virtual-size"] == ODD_SIZE
        h = connect(f"nbd+unix:///?socket={sock}")
        # the full, not the incremental: the discarded MiB still holds its data
        assert h.pread(4096, 6 * MiB) == random_bytes(3 * MiB, 5)[MiB:MiB + 4096]
        assert h.pread(512, ODD_SIZE - 512) == b"\xee" * 512  # the odd-sized disk's last sector
        h.shutdown()
        with pytest.raises(nbd.Error):
            connect(f"nbd+unix:///vda?socket={sock}")  # only the disk asked for is exported
        assert s.stop() == 0


def test_writable_overlay_reaches_nothing(history, tmp_path) -> None:
    repo = Path(history["repo"])
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    sock = tmp_path / "w"
    ref = history["refs"]["vda"].read_bytes()
    with Served(["--repo", str(repo), "--vm", "servevm", "--disk", "vda", "--writable", "--socket", str(sock)]) as s:
        assert s.doc["writable"] is True
        h = connect(f"nbd+unix:///?socket={sock}")
        assert not h.is_read_only()
        h.pwrite(b"\x5a" * 65536, 9 * MiB + 512)
        h.pwrite(bytes(MiB), 0)
        h.flush()
        assert h.pread(65536, 9 * MiB + 512) == b"\x5a" * 65536
        assert h.pread(MiB, 0) == bytes(MiB)
        assert h.pread(4096, 9 * MiB + 512 + 65536) == ref[9 * MiB + 512 + 65536:9 * MiB + 512 + 65536 + 4096]
        h.shutdown()
        assert s.stop() == 0
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == before, "serve --writable changed the repository"
    with Served(["--repo", str(repo), "--vm", "servevm", "--disk", "vda", "--socket", str(sock)]) as s:
        h = connect(f"nbd+unix:///?socket={sock}")
        assert h.pread(65536, 9 * MiB + 512) == ref[9 * MiB + 512:9 * MiB + 512 + 65536], "the writes outlived the server"
        h.shutdown()
        s.stop()


def test_a_damaged_blob_is_an_io_error_never_wrong_bytes(history, tmp_path) -> None:
    repo_dir = tmp_path / "repo"
    shutil.copytree(history["repo"], repo_dir)
    with Repository.open(str(repo_dir)) as repo:
        point = repo.manifest("servevm", history["inc"])
        reader = PointReader(repo, repo.point_view(point)["vda"], "vda")
        victim = next(p for p in reader.pieces if p.blob is not None and p.offset >= 9 * MiB)
        loc = reader._where[victim.blob]
    pack = repo_dir / pack_name(loc.pack)
    with open(pack, "r+b") as f:  # one flipped byte in the middle of the blob's stored payload
        f.seek(loc.offset + loc.length // 2)
        b = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    sock = tmp_path / "d"
    ref = history["refs"]["vda"].read_bytes()
    with Served(["--repo", str(repo_dir), "--vm", "servevm", "--disk", "vda", "--socket", str(sock)]) as s:
        h = connect(f"nbd+unix:///?socket={sock}")
        for _ in range(2):  # not cached as good, nor as bad: each read checks again
            with pytest.raises(nbd.Error) as err:
                h.pread(4096, victim.offset)
            assert err.value.errno == "EIO"  # libnbd names it
        assert h.pread(MiB, 0) == ref[:MiB], "the rest of the disk still reads"
        h.shutdown()
        assert s.stop() == 0
    assert loc.pack in s.stderr, s.stderr  # the log names the damaged pack


def test_bad_inputs_are_one_line_errors(history, tmp_path) -> None:
    sock = tmp_path / "e"
    p = fleece("serve", "--repo", history["repo"], "--vm", "servevm", "--point", "nosuch", "--socket", str(sock))
    assert p.returncode == 1 and "has no point 'nosuch'" in p.stderr and "Traceback" not in p.stderr
    p = fleece("serve", "--repo", history["repo"], "--vm", "servevm", "--disk", "sdz", "--socket", str(sock))
    assert p.returncode == 2 and "no disk sdz" in p.stderr
    p = fleece("serve", "--repo", history["repo"], "--vm", "servevm")
    assert p.returncode == 2 and "--socket" in p.stderr
    with Served(["--repo", history["repo"], "--vm", "servevm", "--socket", str(sock)]) as s:
        p = fleece("serve", "--repo", history["repo"], "--vm", "servevm", "--socket", str(sock))
        assert p.returncode == 2 and "in use by a running server" in p.stderr
        s.stop()
    p = fleece("serve", "--repo", history["repo"], "--vm", "servevm", "--socket", "/tmp/" + "x" * 110, "--json")
    assert p.returncode == 2 and "too long for a Unix socket" in p.stderr
    assert len(p.stdout.splitlines()) == 1 and json.loads(p.stdout)["error"]["kind"] == "usage"  # one line
    sock.write_text("not a socket")
    p = fleece("serve", "--repo", history["repo"], "--vm", "servevm", "--socket", str(sock))
    assert p.returncode == 2 and "is not a socket" in p.stderr and sock.read_text() == "not a socket"
    assert not list(sock.parent.glob("fleece-serve-*"))


def test_a_killed_server_takes_nbdkit_along_even_with_a_client(history, tmp_path) -> None:
    sock = tmp_path / "k"
    s = Served(["--repo", history["repo"], "--vm", "servevm", "--socket", str(sock)])
    pid = s.doc["pid"]
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert not [v for v in env if v.startswith((b"FLEECE_PASSWORD", b"FLEECE_KEY_FILE"))], "a secret in nbdkit's env"
    client = connect(s.doc["exports"]["vda"])  # connected and idle: nbdkit alone would wait for it forever
    client.pread(4096, 0)
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "nbdkit outlived a SIGKILLed fleece serve"
    del client
    with Served(["--repo", history["repo"], "--vm", "servevm", "--socket", str(sock)]) as s2:  # stale socket
        assert s2.stop() == 0


def copy_to_bucket(repo_dir: Path, bucket: str, prefix: str) -> str:
    """The same repository's objects under *prefix* of *bucket*: the format is the backend's keys, so a
    directory copied to S3 is that repository in S3 (``aws s3 sync`` would do the same)."""
    import boto3

    client = boto3.client("s3")
    for f in repo_dir.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(repo_dir)}")
    return f"s3://{bucket}/{prefix}"


def test_serve_from_s3_fetches_only_what_is_read(history, s3_bucket, unique, tmp_path) -> None:
    url = copy_to_bucket(Path(history["repo"]), s3_bucket, f"serve-{unique}")
    truth = history["refs"]["vda"].read_bytes()
    with Repository.open(url) as repo:
        r = PointReader(repo, repo.manifest("servevm", history["inc"]), "vda", workers=4)
        try:
            gets = repo.requests().get("GET", 0)
            assert gets > 0, repo.requests()
            buf = memoryview(bytearray(4096))
            r.pread(buf, 9 * MiB + 12345)  # a guest's first small read: one blob, one ranged GET
            assert bytes(buf) == truth[9 * MiB + 12345:9 * MiB + 12345 + 4096]
            assert r.stats.blobs == 1 and r.stats.fetched_bytes == r._where[r.pieces[r._span(9 * MiB, 9 * MiB + 1)[0]].blob].length
            big = memoryview(bytearray(4 * MiB))
            for off in range(0, VDA, 4 * MiB):
                r.pread(big[:min(4 * MiB, VDA - off)], off)
                assert bytes(big[:min(4 * MiB, VDA - off)]) == truth[off:off + 4 * MiB]
            stored = sum(loc.length for loc in r._where.values())
            assert r.stats.fetched_bytes == stored, "a byte fetched twice, or one the point does not need"
            assert repo.requests().get("GET", 0) - gets <= len(r._where)
        finally:
            r.close()
    sock = tmp_path / "s3.sock"
    with Served(["--repo", url, "--vm", "servevm", "--socket", str(sock)]) as s:
        for disk, ref in history["refs"].items():
            identical(s.doc["exports"][disk], ref, fmt="raw")
        assert s.stop() == 0


# -- the reader itself, in-process -------------------------------------------------------------------------

def test_reader_reads_across_pieces_with_a_small_cache(history) -> None:
    truth = history["refs"]["vda"].read_bytes()
    with Repository.open(history["repo"]) as repo:
        point = repo.manifest("servevm", history["inc"])
        r = PointReader(repo, point, "vda", cache_bytes=0, workers=3, readahead=8 * MiB)
        try:
            assert r.cache_bytes >= 32 * MiB  # never below what one read touches
            for off, n in [(0, 1), (10 * MiB + 4000, 200_000), (12 * MiB - 3, 6), (VDA - 65536 - 7, 65543),
                           (4 * MiB - 4096, 8192), (8 * MiB, 32 * MiB)]:
                buf = bytearray(n)
                r.pread(memoryview(buf), off)
                assert bytes(buf) == truth[off:off + n], (off, n)
            runs = r.extents(0, VDA)
            assert runs[0][0] == 0 and sum(n for _, n, _ in runs) == VDA
            for off, n, kind in runs:
                assert kind in (EXTENT_DATA, EXTENT_HOLE_ZERO)
                if kind == EXTENT_HOLE_ZERO:
                    assert truth[off:off + n].count(0) == n
            assert r.extents(5, 10) == [(5, 10, EXTENT_DATA)]
            # many threads, sequential and random reads at once: every answer exact
            errors: list[BaseException] = []

            def reader(seed: int) -> None:
                import random
                rnd = random.Random(seed)
                try:
                    for _ in range(30):
                        off = rnd.randrange(0, VDA - 1)
                        n = min(rnd.choice([512, 4096, 65536, MiB]), VDA - off)
                        buf = bytearray(n)
                        r.pread(memoryview(buf), off)
                        assert bytes(buf) == truth[off:off + n], (off, n)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
            threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            assert r.stats.errors == 0 and r.stats.blobs >= len(r._where)
        finally:
            r.close()


def test_reader_reads_ahead_of_a_sequential_reader(history) -> None:
    with Repository.open(history["repo"]) as repo:
        point = repo.manifest("servevm", history["inc"])
        r = PointReader(repo, point, "vda", workers=2, readahead=16 * MiB)
        try:
            buf = memoryview(bytearray(MiB))
            for off in range(8 * MiB, 16 * MiB, MiB):
                r.pread(buf, off)
            time.sleep(0.5)
            s = r.stats
            assert s.prefetched > 0
            assert s.blobs <= len(r._where), "a blob was decoded twice though the cache holds the whole disk"
            before = s.misses
            r.pread(buf, 16 * MiB)  # read ahead: found decoded or on its way, not fetched by the read
            assert r.stats.misses == before
        finally:
            r.close()


# -- fleece mount: the disk as a file through FUSE -----------------------------------------------------------

def test_mount_shows_the_disk_as_a_private_read_only_file(history, tmp_path) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("nbdfuse") is None:
        pytest.skip("no FUSE here (/dev/fuse, nbdfuse): fleece mount says so itself, tested below")
    mp = tmp_path / "mp"
    mp.mkdir()
    p = fleece("mount", "--repo", history["repo"], "--vm", "servevm", str(mp))
    assert p.returncode == 2 and "name one with --disk" in p.stderr
    proc = subprocess.Popen([FLEECE, "mount", "--repo", history["repo"], "--vm", "servevm", "--disk", "vdb", str(mp),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc = json.loads(proc.stdout.readline() or "{}")
        assert doc.get("path") == str(mp / "vdb"), proc.stderr.read() if proc.poll() is not None else doc
        assert os.path.ismount(mp)
        f = mp / "vdb"
        assert f.stat().st_size == ODD_SIZE
        assert f.read_bytes() == history["refs"]["vdb"].read_bytes()
        with pytest.raises(OSError):
            open(f, "r+b")  # read-only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.ismount(mp) and not list(mp.iterdir()), "unmounted, nothing left"
    # a SIGKILLed mount: nbdfuse unmounts and exits, nbdkit dies with it
    proc = subprocess.Popen([FLEECE, "mount", "--repo", history["repo"], "--vm", "servevm", "--disk", "vdb", str(mp),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    json.loads(proc.stdout.readline())
    left = children(proc.pid)
    assert left, "no nbdkit/nbdfuse under fleece mount"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while (os.path.ismount(mp) or any(alive(c) for c in left)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.ismount(mp), "a SIGKILLed fleece mount left its mount"
    assert not [c for c in left if alive(c)], "a SIGKILLed fleece mount left processes"
    again = fleece("mount", "--repo", history["repo"], "--vm", "servevm", "--disk", "vdb", str(tmp_path / "none"))
    assert again.returncode == 2 and "is not a directory" in again.stderr


def test_mount_without_fuse_says_what_to_do(history, tmp_path, monkeypatch) -> None:
    from fleece.repository.errors import HostError
    from fleece.restore import mount

    monkeypatch.setattr(mount.shutil, "which", lambda name: None)  # a machine without nbdfuse
    with pytest.raises(HostError, match="nbdfuse is not installed.*fleece serve"):
        mount.check_fuse()
