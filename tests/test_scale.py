"""Scale: an incremental backup's cost must not grow with the repository's history.

An incremental deduplicates against its parent chains' blob ids only (``exporter/backup.py``,
``_Run._known_blobs`` → ``Repository.writer(known=...)``) and loads no index, so a repository ten
thousand backups old must cost it no more time nor memory than an empty one. Proved here end to end with
the real CLI, not by reasoning about the code: one guest-less VM is backed up alternately into

* a synthetic encrypted repository holding what 10,000 backup runs of 100 VMs would leave — 1,000,000
  blobs, 10,000 packs, 10,000 index objects and 10,000 points (each run: one full point of ~100 blobs of
  its own, one pack, one index object; as a repository looks before any prune consolidates its index),
  built through the repository API in well under a minute (nothing is cached between runs), and
* an empty one,

and each incremental's wall time and peak RSS (``ru_maxrss`` of that ``fleece`` process alone, from
``os.wait4`` in a small go-between: see :data:`LAUNCHER`) are compared. Interleaving the runs spreads
the noise of a shared machine over both sides.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import FLEECE, env_with, fleece, identical, ok
from conftest import MiB
from fleece.repository import RepoConfig, Repository
from fleece.repository.codec import Codec
from fleece.repository.index import encode_index
from fleece.repository.manifest import KIND_FULL, DiskRecord, Manifest, new_point_id
from fleece.repository.pack import PackBuilder, pack_name
from fleece.repository.writer import MAX_PACK_ENTRIES
from vm import TestVM, random_bytes

pytestmark = pytest.mark.slow

VMS = 100
POINTS_PER_VM = 100
BLOBS_PER_POINT = 100
BLOB_SIZE = 64
POINTS = VMS * POINTS_PER_VM  # one backup run each: one pack, one index object, one manifest
BLOBS = POINTS * BLOBS_PER_POINT
ROUNDS = 5  # incrementals per repository (interleaved); the medians are compared
DISK = 16 * MiB
TIME_RATIO, TIME_SLACK, RSS_RATIO = 1.2, 0.1, 1.2

assert BLOBS_PER_POINT <= MAX_PACK_ENTRIES


@dataclass
class History:
    """What the synthetic repository holds, and what building it cost."""

    url: str
    blobs: int
    packs: int
    indexes: int
    points: int
    seconds: float
    stored_bytes: int


@dataclass
class Run:
    """One measured ``fleece backup``."""

    doc: dict
    seconds: float
    maxrss_kib: int


def build_history(url: str) -> History:
    """Write 10,000 backup runs' worth of objects into a new encrypted repository at *url*.

    Each run stores what ``BlobWriter`` and ``Repository.commit`` would (:func:`_one_run`), in their
    order: its pack, its index object, then its manifest. Points of one VM are an hour apart, their ids
    sorting by time as real ones do. The CPU work (keyed ids, seals, manifests) is GIL-bound and stays
    on this thread; the PUTs (fsync-bound) go to a pool, a bounded number at a time.
    """
    started = time.monotonic()
    repo = Repository.open(url, create=True, config=RepoConfig.encrypted())
    codec = Codec(repo.config.compression.get("level", 3), repo.envelope.blob_id)
    layout = repo.envelope.packs
    builder = PackBuilder(BLOBS_PER_POINT * (BLOB_SIZE + layout.overhead) + layout.span(BLOBS_PER_POINT), layout)
    data = memoryview(os.urandom(BLOBS * BLOB_SIZE))
    first = time.time() - POINTS_PER_VM * 3600
    in_flight = threading.BoundedSemaphore(256)

    def store(objects: list[tuple[str, bytes]]) -> None:
        try:
            for name, body in objects:
                assert repo.backend.put_if_absent(name, body), name
        finally:
            in_flight.release()

    indexed = 0
    with ThreadPoolExecutor(8, thread_name_prefix="history") as pool:
        futures: list[Future[None]] = []
        for run in range(POINTS):
            blobs = data[run * BLOBS_PER_POINT * BLOB_SIZE:(run + 1) * BLOBS_PER_POINT * BLOB_SIZE]
            when = first + (run // VMS) * 3600 + run % VMS
            objects, count = _one_run(repo, codec, builder, blobs, f"vm{run % VMS:03d}", when)
            indexed += count
            in_flight.acquire()
            futures.append(pool.submit(store, objects))
        for f in futures:
            f.result()
    repo.close()
    return _census(Path(url), indexed, time.monotonic() - started)


def _one_run(repo: Repository, codec: Codec, builder: PackBuilder, blobs: memoryview, vm: str,
             when: float) -> tuple[list[tuple[str, bytes]], int]:
    """The objects one backup run of a full point holding *blobs* (``BLOB_SIZE`` bytes each) leaves,
    ``[(pack, bytes), (index object, bytes), (manifest, bytes)]`` (the commit point last), and how many
    blobs its index object lists. Its blobs are
    encoded as the writer does (keyed ids; random data stays raw) into one sealed pack, whose table is
    the run's index object; the point's extent map references each blob once."""
    envelope = repo.envelope
    ids = []
    for at in range(0, len(blobs), BLOB_SIZE):
        encoded = codec.encode(blobs[at:at + BLOB_SIZE])
        builder.add(encoded)
        ids.append(encoded.id)
    pack, view, entries = builder.finish()
    body, header, entries = bytes(view), builder.header, list(entries)
    builder.reset()
    index, table = encode_index([(pack, entries, header)], envelope.meta)
    granule = 65536
    disk = DiskRecord(kind=KIND_FULL, virtual_size=len(ids) * granule,
                      extents=[(i * granule, BLOB_SIZE, b) for i, b in enumerate(ids)])
    point = Manifest(id=new_point_id(when), vm=vm, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                     parent=None, kind=KIND_FULL, disks={"vda": disk}, tool="synthetic history",
                     extra={"host": "history"})
    name = envelope.manifest_name(vm, point.id)
    return [(pack_name(pack), body), (f"index/{index}", table),
            (name, envelope.seal_manifest(name, point.to_bytes()))], len(entries)


def _census(root: Path, blobs: int, seconds: float) -> History:
    """Count the objects the repository at *root* really holds (not what the generator meant to write);
    *blobs*: the entries its index objects list."""
    def files(top: str) -> list[Path]:
        return [p for p in (root / top).rglob("*") if p.is_file()]

    packs, indexes, points = files("data"), files("index"), files("points")
    stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return History(str(root), blobs, len(packs), len(indexes), len(points), seconds, stored)


#: Runs ``argv[2:]`` and writes its wall time and peak RSS (``os.wait4``: that process's own
#: ``ru_maxrss``, KiB) to the file ``argv[1]``; exits with its code. A go-between, because Linux starts a
#: new program's ``ru_maxrss`` at the high-water mark of the image it replaced (``exec_mmap`` in
#: fs/exec.c): a child forked (or vforked) straight from this test process, which holds the history's
#: hundreds of MiB, would report at least that. This small process is what ``fleece`` replaces instead.
LAUNCHER = """
import os, sys, time
t0 = time.monotonic()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.monotonic() - t0} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured_backup(vm: TestVM, repo: str, scratch: Path, log: Path) -> Run:
    """One ``fleece backup --json`` as a user runs it, with its wall time and its own peak RSS."""
    out, err, usage = log.with_suffix(".out"), log.with_suffix(".err"), log.with_suffix(".usage")
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage), FLEECE, "backup", "--qmp", vm.qmp_path,
                              "--repo", repo, "--scratch", str(scratch), "--json"],
                             stdout=stdout, stderr=stderr, env=env_with())
        p.wait(600)
    assert p.returncode == 0, f"exit {p.returncode}: {out.read_text()[-800:]} {err.read_text()[-1500:]}"
    seconds, maxrss = usage.read_text().split()
    return Run(json.loads(out.read_text()), float(seconds), int(maxrss))


def guest_write(vm: TestVM, n: int) -> None:
    """A small guest write into the last 4 MiB of the disk: the audit's tail pieces then include parts
    of blobs, whose bytes it reads back from the repository — the one read an incremental does there."""
    vm.write("vda", DISK - 4 * MiB + (n * 192 * 1024) % (4 * MiB - 8192), random_bytes(8192, 1000 + n))


def interleaved_incrementals(vm: TestVM, repos: dict[str, str], scratch: Path, logs: Path
                             ) -> tuple[dict[str, list[Run]], dict[str, Path]]:
    """``ROUNDS`` incrementals into each repository, alternating (a small guest write before each), every
    one checked to be an incremental; returns the runs per repository and the ground truth of the
    last point of the "big" one."""
    runs: dict[str, list[Run]] = {which: [] for which in repos}
    truth: dict[str, Path] = {}
    for n in range(ROUNDS):
        for i, (which, url) in enumerate(repos.items()):
            guest_write(vm, len(repos) * n + i)
            refs = vm.snapshot_refs(f"{which}{n}")  # nothing writes during the run: the truth at its freeze
            if which == "big":
                truth = refs
            run = measured_backup(vm, url, scratch, logs / f"inc-{which}-{n}")
            assert run.doc["kind"] == "incremental" and run.doc["disks"]["vda"]["kind"] == "incremental", run.doc
            runs[which].append(run)
            print(f"incremental {n} into {which}: {run.seconds:.3f} s, peak RSS {run.maxrss_kib / 1024:.1f} MiB, "
                  f"{run.doc['new_blobs']} new blob(s), requests {run.doc['backend_requests']}")
    return runs, truth


def test_incremental_cost_does_not_grow_with_history(make_vm, tmp_path: Path) -> None:
    history = build_history(str(tmp_path / "big"))
    assert (history.blobs, history.packs, history.indexes, history.points) == (BLOBS, POINTS, POINTS, POINTS), history
    print(f"\nsynthetic history: {history.blobs:,} blobs in {history.packs:,} packs, {history.indexes:,} index "
          f"objects, {history.points:,} points ({VMS} VMs x {POINTS_PER_VM}), {history.stored_bytes / MiB:.0f} MiB, "
          f"built in {history.seconds:.1f} s")
    repos = {"empty": str(tmp_path / "empty"), "big": history.url}
    Repository.open(repos["empty"], create=True, config=RepoConfig.encrypted()).close()

    vm = make_vm({"vda": DISK})
    vm.write("vda", 0, random_bytes(DISK, 1))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    for which, url in repos.items():  # not measured: the full loads the index (1M blobs in "big")
        full = measured_backup(vm, url, scratch, logs / f"full-{which}")
        assert full.doc["kind"] == "full", full.doc
        print(f"full into {which}: {full.seconds:.2f} s, peak RSS {full.maxrss_kib / 1024:.0f} MiB")

    runs, truth = interleaved_incrementals(vm, repos, scratch, logs)

    time_med = {w: statistics.median(r.seconds for r in rs) for w, rs in runs.items()}
    rss_med = {w: statistics.median(r.maxrss_kib for r in rs) for w, rs in runs.items()}
    print(f"median incremental: empty {time_med['empty']:.3f} s / {rss_med['empty'] / 1024:.1f} MiB, "
          f"big {time_med['big']:.3f} s / {rss_med['big'] / 1024:.1f} MiB "
          f"(x{time_med['big'] / time_med['empty']:.2f} time, x{rss_med['big'] / rss_med['empty']:.2f} RSS)")

    # The last point of the big repository restores bit-exact, whatever history surrounds it.
    out = tmp_path / "restored"
    ok(fleece("restore", "--repo", history.url, "--vm", vm.name, "--out", str(out), "--flat", "--format", "raw",
              "--json", env=env_with()))
    identical(out / "vda.raw", truth["vda"], "raw")

    detail = {w: [(round(r.seconds, 3), r.maxrss_kib, r.doc["backend_requests"]) for r in rs] for w, rs in runs.items()}
    assert time_med["big"] <= TIME_RATIO * time_med["empty"] + TIME_SLACK, (time_med, detail)
    assert rss_med["big"] <= RSS_RATIO * rss_med["empty"], (rss_med, detail)
