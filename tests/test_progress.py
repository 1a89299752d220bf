"""Progress as a user sees it on a terminal: ``fleece backup`` run under a real pseudo-terminal (stderr on
the pty) against a real VM, its output captured byte for byte and taken apart into frames and log lines.

What must hold: the backup's line counts bytes *committed* to the repository (never more than the
repository holds at that moment, so with ``--bwlimit`` it cannot race ahead of the upload), it ends at
100 % of the planned total, log lines get lines of their own (never glued to or overwritten by a frame),
and with stderr not a terminal there is no progress output at all. Restore and verify show their totals
from the start (percent, rate, ETA) and end at 100 %.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from checks import FLEECE, fleece
from conftest import MiB
from fleece.repository import DiskRecord, Manifest, RepoConfig, Repository, new_point_id
from vm import random_bytes

RATE = 4 * MiB  # --bwlimit of the backup: DATA takes ~2 s to upload
BURST = MiB  # the token bucket starts full with min(rate / 4, 4 MiB)
DATA = 8 * MiB  # incompressible: what is stored is what was read

SIZE = r"[\d.]+ [KMGT]?i?B"
BACKUP_FRAME = re.compile(rf"^backup +(\d+)% \|[^|]*\| ({SIZE}) of ({SIZE})(\+?) committed · ETA (\S+) · "
                          rf"stored (\S+(?: \S+/s)?) · read")
DONE_FRAME = re.compile(rf"^(restore|verify) +(\d+)% \|[^|]*\| ({SIZE}) of ({SIZE}) (written|read) · (\S+(?: \S+/s)?) "
                        r"· ETA (\S+)")


@dataclass
class PtyRun:
    returncode: int
    stdout: str
    # (seconds since start, text read from the pty, bytes of packs durable in the repository right after)
    chunks: list[tuple[float, str, int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c for _, c, _ in self.chunks).replace("\r\n", "\n")  # the pty's ONLCR

    def segments(self) -> list[tuple[int, int, str]]:
        """(line number, segment number, text): each line split at carriage returns, i.e. into what was
        drawn over the same line of the terminal one after the other."""
        return [(i, j, seg) for i, line in enumerate(self.text.split("\n")) for j, seg in enumerate(line.split("\r"))]

    def timed_frames(self, pattern: re.Pattern[str]) -> list[tuple[float, int, re.Match[str]]]:
        """Every frame matching *pattern*, with when it was read and what the repository held just after."""
        out, pending = [], ""
        for t, chunk, held in self.chunks:
            pending += chunk.replace("\r\n", "\n")
            *complete, pending = re.split(r"[\r\n]", pending)
            out += [(t, held, m) for seg in complete if (m := pattern.match(seg))]
        return out


def durable_bytes(repo: Path) -> int:
    """Bytes of complete packs in a local repository (temp files of uploads in flight are not packs)."""
    data = repo / "data"
    total = 0
    for root, _, files in os.walk(data):
        for name in files:
            if ".tmp-" not in name:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def run_on_pty(args: list[str], repo: Path, timeout: float = 300) -> PtyRun:
    """Run ``fleece ARGS`` with stderr on a fresh 160-column pseudo-terminal, stdout on a pipe."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    started = time.monotonic()
    proc = subprocess.Popen([FLEECE, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    run = PtyRun(0, "")
    try:
        while True:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"fleece {' '.join(args)} did not finish in {timeout} s")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty is gone
                break
            if not data:
                break
            run.chunks.append((time.monotonic() - started, data.decode(errors="replace"), durable_bytes(repo)))
    finally:
        if proc.poll() is None and time.monotonic() - started > timeout:
            proc.kill()
        run.returncode = proc.wait()
        reader.join()
        os.close(master)
    run.stdout = out[0].decode() if out else ""
    return run


def mib(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit] / MiB


def assert_log_lines_stand_alone(run: PtyRun) -> int:
    """Every log line starts a line of the terminal, owns it, and ends it: the frame before it was wiped
    (a blank segment at least as long), nothing is drawn over it. Returns how many were written while a
    progress line was up."""
    segs = run.segments()
    by_line: dict[int, list[str]] = {}
    for i, _, seg in segs:
        by_line.setdefault(i, []).append(seg)
    under_bar = 0
    seen_frame = False
    for i, j, seg in segs:
        if "%|" in seg or seg.startswith(("backup", "restore", "verify")):
            assert "fleece:" not in seg, f"log text glued to a frame: {seg!r}"
            seen_frame = True
        if "fleece:" not in seg:
            continue
        line = by_line[i]
        assert seg.startswith("fleece: "), f"log line does not start its line: {seg!r}"
        assert "%|" not in seg and "█" not in seg, f"frame text inside a log line: {seg!r}"
        assert j == len(line) - 1, f"something was drawn over the log line {seg!r}: {line!r}"
        if j >= 1:  # what came before on this terminal line was wiped
            assert not line[j - 1].strip(), f"log line written over a frame without clearing it: {line!r}"
            if j >= 2:
                assert len(line[j - 1]) >= len(line[j - 2].rstrip()), f"frame only partly wiped: {line!r}"
        under_bar += seen_frame
    return under_bar


def test_backup_progress_counts_what_is_committed(make_vm, tmp_path, scratch) -> None:
    vm = make_vm()
    vm.write("vda", 0, random_bytes(DATA, 3))
    repo = tmp_path / "repo"
    # 1 MiB blobs in 1 MiB packs: the committed count moves in eight steps, each when a pack's upload finished.
    Repository.open(str(repo), create=True, config=RepoConfig(chunk_size=MiB, pack_target=MiB)).close()

    run = run_on_pty(["backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(scratch),
                      "--bwlimit", f"{RATE}", "--json"], repo)
    assert run.returncode == 0, run.text
    doc = json.loads(run.stdout)
    assert doc["kind"] == "full" and doc["disks"]["vda"]["read_bytes"] == DATA

    frames = run.timed_frames(BACKUP_FRAME)
    assert frames, f"no backup progress frames in {run.text[:2000]!r}"
    for t, held, m in frames:
        pct = int(m.group(1))
        shown = pct * DATA / 100  # the percent is rounded down, so this is at most what was committed
        # Committed bytes are in complete packs: never more than the repository held when the frame was read.
        assert shown <= held, f"frame at {t:.2f} s shows {pct} % but only {held} bytes of packs exist: {m.group(0)}"
        # And the link: nothing can have been sent faster than --bwlimit (plus the bucket's first burst).
        assert shown <= RATE * t + BURST + MiB, f"{pct} % at {t:.2f} s is faster than --bwlimit: {m.group(0)}"
        assert m.group(3) == "8.0 MiB", m.group(0)  # the plan's total, from the first frame on
    last = frames[-1][2]
    assert last.group(1) == "100" and last.group(2) == "8.0 MiB" and not last.group(4), last.group(0)
    middle = {int(m.group(1)) for _, _, m in frames if 0 < int(m.group(1)) < 100}
    assert len(middle) >= 2, f"the line jumped instead of following the uploads: {sorted(middle)}"

    assert assert_log_lines_stand_alone(run) >= 1  # "committed point …" came while the line was up
    assert "committed point" in run.text

    # stderr not a terminal: the log lines, and not one byte of progress.
    vm.write("vda", 0, random_bytes(MiB, 4))
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(scratch), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kind"] == "incremental"
    assert p.stderr and "\r" not in p.stderr and "%|" not in p.stderr and "committed ·" not in p.stderr
    assert all(line.startswith("fleece: ") for line in p.stderr.splitlines()), p.stderr


def write_point(repo: Repository, chunks: list[bytes], disk: str = "vda") -> Manifest:
    """A full point of one disk straight through the repository API (no VM needed to restore it)."""
    extents = []
    lock = threading.Lock()
    with repo.writer() as w:
        for i, data in enumerate(chunks):
            def done(ident: bytes, stored: int, off: int = i * len(chunks[0]), n: int = len(data)) -> None:
                with lock:
                    extents.append((off, n, ident))
            w.add(data, done)
        w.flush()
    size = 4 * len(chunks[0]) * len(chunks)
    m = Manifest(new_point_id(), "vm1", "2026-11-26T00:00:00Z", None, "full",
                 {disk: DiskRecord("full", size, sorted(extents), qcow2={"cluster_size": 65536})})
    repo.commit(m)
    return m


def test_restore_and_verify_show_their_totals_from_the_start(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    repo = Repository.open(str(repo_path), create=True)
    chunks = [random_bytes(MiB, 10 + i) for i in range(6)]
    write_point(repo, chunks + chunks[:2])  # 8 MiB of extents, 6 MiB of distinct blobs
    repo.close()

    run = run_on_pty(["restore", "--repo", str(repo_path), "--vm", "vm1", "--out", str(tmp_path / "out")], repo_path)
    assert run.returncode == 0, run.text
    frames = [m for _, _, m in run.timed_frames(DONE_FRAME)]
    assert frames, run.text[:2000]
    assert all(m.group(1) == "restore" and m.group(4) == "8.0 MiB" for m in frames), [m.group(0) for m in frames]
    assert frames[-1].group(2) == "100" and frames[-1].group(3) == "8.0 MiB", frames[-1].group(0)
    assert frames[-1].group(7) == "0:00"
    assert_log_lines_stand_alone(run)

    run = run_on_pty(["verify", "--repo", str(repo_path), "--read-data"], repo_path)
    assert run.returncode == 0, run.text
    frames = [m for _, _, m in run.timed_frames(DONE_FRAME)]
    assert frames, run.text[:2000]
    assert all(m.group(1) == "verify" and m.group(4) == "6.0 MiB" for m in frames), [m.group(0) for m in frames]
    assert frames[-1].group(2) == "100" and frames[-1].group(3) == "6.0 MiB", frames[-1].group(0)

    p = fleece("verify", "--repo", str(repo_path), "--read-data")  # not a terminal: no progress at all
    assert p.returncode == 0 and "\r" not in p.stderr and "%|" not in p.stderr, p.stderr
