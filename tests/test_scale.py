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
``os.wait4``) are compared. Interleaving the runs spreads the noise of a shared machine over both sides.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
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
GENERATION_BUDGET = 60.0  # seconds the synthetic history may take to build
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

    Each run is what ``BlobWriter`` and ``Repository.commit`` would store: its blobs encoded by a
    ``Codec`` (keyed ids, raw because random) into one sealed pack, that pack's table in one index
    object, then a full point's manifest referencing exactly those blobs (so every blob is referenced),
    in that order. Points of one VM are an hour apart, ids sorting by time as real ones do. The CPU
    work (ids, seals, manifests) is GIL-bound and stays on this thread; the PUTs (fsync-bound) go to a
    pool, a bounded number at a time.
    """
    started = time.monotonic()
    repo = Repository.open(url, create=True, config=RepoConfig.encrypted())
    envelope, backend = repo.envelope, repo.backend
    codec = Codec(repo.config.compression.get("level", 3), envelope.blob_id)
    layout = envelope.packs
    builder = PackBuilder(BLOBS_PER_POINT * (BLOB_SIZE + layout.overhead) + layout.span(BLOBS_PER_POINT), layout)
    data = os.urandom(BLOBS * BLOB_SIZE)
    first = time.time() - POINTS_PER_VM * 3600
    granule = 65536
    in_flight = threading.BoundedSemaphore(256)
    futures: list[Future[None]] = []

    def store(pack: str, body: bytes, index: str, table: bytes, name: str, manifest: bytes) -> None:
        try:
            backend.put(pack_name(pack), body)
            backend.put(f"index/{index}", table)
            assert backend.put_if_absent(name, manifest), name  # the commit point, last
        finally:
            in_flight.release()

    with ThreadPoolExecutor(8, thread_name_prefix="history") as pool:
        for run in range(POINTS):
            vm, when = f"vm{run % VMS:03d}", first + (run // VMS) * 3600 + (run % VMS)
            base = run * BLOBS_PER_POINT * BLOB_SIZE
            ids = []
            for i in range(BLOBS_PER_POINT):
                encoded = codec.encode(memoryview(data)[base + i * BLOB_SIZE:base + (i + 1) * BLOB_SIZE])
                builder.add(encoded)
                ids.append(encoded.id)
            pack, view, entries = builder.finish()
            body, header, entries = bytes(view), builder.header, list(entries)
            builder.reset()
            index, table = encode_index([(pack, entries, header)], envelope.meta)
            point = Manifest(id=new_point_id(when), vm=vm, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                             parent=None, kind=KIND_FULL, tool="synthetic history", extra={"host": "history"},
                             disks={"vda": DiskRecord(kind=KIND_FULL, virtual_size=BLOBS_PER_POINT * granule,
                                                      extents=[(i * granule, BLOB_SIZE, b) for i, b in enumerate(ids)])})
            name = envelope.manifest_name(vm, point.id)
            in_flight.acquire()
            futures.append(pool.submit(store, pack, body, index, table, name,
                                       envelope.seal_manifest(name, point.to_bytes())))
        for f in futures:
            f.result()
    repo.close()
    root = Path(url)
    stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return History(url, BLOBS, POINTS, POINTS, POINTS, time.monotonic() - started, stored)


def measured_backup(vm: TestVM, repo: str, scratch: Path, log: Path) -> Run:
    """One ``fleece backup --json`` as a user runs it; its wall time and its own peak RSS (``os.wait4``
    on its pid: ``ru_maxrss`` of that child only, KiB on Linux)."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        t0 = time.monotonic()
        p = subprocess.Popen([FLEECE, "backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch),
                              "--json"], stdout=stdout, stderr=stderr, env=env_with())
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    assert p.returncode == 0, f"exit {p.returncode}: {out.read_text()[-800:]} {err.read_text()[-1500:]}"
    return Run(json.loads(out.read_text()), seconds, usage.ru_maxrss)


def guest_write(vm: TestVM, n: int) -> None:
    """A small guest write into the last 4 MiB of the disk: the audit's tail pieces then include parts
    of blobs, whose bytes it reads back from the repository — the one read an incremental does there."""
    vm.write("vda", DISK - 4 * MiB + (n * 192 * 1024) % (4 * MiB - 8192), random_bytes(8192, 1000 + n))


def test_incremental_cost_does_not_grow_with_history(make_vm, tmp_path: Path) -> None:
    history = build_history(str(tmp_path / "big"))
    print(f"\nsynthetic history: {history.blobs:,} blobs in {history.packs:,} packs, {history.indexes:,} index "
          f"objects, {history.points:,} points ({VMS} VMs x {POINTS_PER_VM}), {history.stored_bytes / MiB:.0f} MiB, "
          f"built in {history.seconds:.1f} s")
    assert history.seconds <= GENERATION_BUDGET, f"building the history took {history.seconds:.1f} s"
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

    runs: dict[str, list[Run]] = {"empty": [], "big": []}
    truth: dict[str, Path] = {}
    for n in range(ROUNDS):
        for which, url in repos.items():
            guest_write(vm, 2 * n + (which == "big"))
            refs = vm.snapshot_refs(f"{which}{n}")  # nothing writes during the run: the truth at its freeze
            if which == "big":
                truth = refs
            run = measured_backup(vm, url, scratch, logs / f"inc-{which}-{n}")
            assert run.doc["kind"] == "incremental" and run.doc["disks"]["vda"]["kind"] == "incremental", run.doc
            runs[which].append(run)
            print(f"incremental {n} into {which}: {run.seconds:.3f} s, peak RSS {run.maxrss_kib / 1024:.1f} MiB, "
                  f"{run.doc['new_blobs']} new blob(s), requests {run.doc['backend_requests']}")

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

    assert time_med["big"] <= TIME_RATIO * time_med["empty"] + TIME_SLACK, time_med
    assert rss_med["big"] <= RSS_RATIO * rss_med["empty"], rss_med
