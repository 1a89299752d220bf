"""fleece benchmark: backup and restore side by side with the baselines of the same run.

Cases (each repetition interleaves all of them on a fresh copy of the cached disk; medians are reported):

* ``nbdcopy``        — nbdcopy of the whole live disk to ``null:`` (what reading the disk costs)
* ``zstd-limit``     — the full's data cells compressed by one zstd compressor per core (the CPU limit)
* ``fleece-full``    — ``fleece backup`` (full) to a local repository, encrypted (format 2, the default — fair
  against restic, which encrypts too)
* ``fleece-full-plain`` — the same full of the same disk state, back to back with it, to a second local
  repository made with ``fleece init --no-encryption`` (format 1): the twin that prices encryption
* ``fleece-inc``     — ``fleece backup`` after the ~3 % change (encrypted repository)
* ``fleece-inc-plain`` — the incremental of that same change to the plaintext repository, back to back.
  The VM's dirty bitmaps belong to one repository each, so the two repositories keep their own chains;
  each takes an incremental after every change (``fleece-inc-more`` / ``fleece-inc-more-plain`` for the
  later ones), so both cover the same changes and both last points hold the same disk
* ``plain-read``     — libnbd reading exactly the incremental's data extents (no hashing, no compression)
* ``fleece-restore-chain`` / ``fleece-restore-flat`` — restore of the last point of a 1 full + 5
  incrementals chain (encrypted); ``fleece-restore-flat-plain`` — the flat restore of the plaintext
  repository's last point (same disk, same chain length). The twins swap places every other
  repetition (the second of two back-to-back runs is not timed like the first): use an even ``--reps``
  for the encryption rows, and read them as rough with ``--quick``'s single repetition
* ``qemu-img-convert`` — ``qemu-img convert -O qcow2`` of that chain from local qcow2 files
* ``qemu-img-convert-warm`` / ``qemu-img-convert-cold`` — the flat-restore baseline of issue #13:
  ``qemu-img convert -O qcow2`` of one local qcow2 holding the very disk the restored point holds (the
  VM's own image once it quit), its source read once right before (``cat``: in the page cache) or
  after ``sync; echo 3 > /proc/sys/vm/drop_caches`` (cold; the last case of a repetition, and fleece's
  code is read back in untimed after it, so the drop slows no other timed case)
* ``fleece-verify-point`` — ``fleece verify --point <last point> --read-data`` of the encrypted
  repository; ``fleece-restore-verify-only`` — ``fleece restore --flat --verify-only`` of that point
  (decodes and checks all a restore would write, writes nothing): MB/s rows from their own reports
* ``sha256-limit``   — the same cells hashed by one SHA-256 per core
* with a Ceph RGW (started here, bluestore): ``fleece-full-s3``, ``fleece-inc-s3`` (after the first change),
  ``fleece-inc-more-s3`` (after each later one: the RGW chain is as long as the local one and its last
  point the same disk), ``fleece-restore-flat-s3`` (encrypted; with its GET requests and the bytes it
  fetched against the stored bytes of the packs the point needs)
* peers, on the raw twin of the disk (they back up files): ``restic-full``/``restic-inc`` (local repository,
  restic's defaults: compression auto, AES), ``restic-*-s3`` (same RGW), ``borg-full``/``borg-inc``
  (``--encryption=none --compression zstd,3``)

Once per run, not per repetition (their rows are that one run, or the median of their own three):

* ``--sparse`` (default on, ``--quick`` too; ``--no-sparse`` skips it): ``fleece-full-sparse-1t`` —
  ``fleece backup --full`` of a 1 TiB qcow2 with 2,000 scattered 64 KiB clusters
  (``tools/bench_plan.build_image``, fixed seed; cached) to a fresh local repository, three times
  (rep 0-2): a full must cost what the data costs, not the disk size
* ``--big`` (default on, ``--no-big`` skips it; off with ``--quick`` unless given): a 64 GiB qcow2 with
  ~4 GiB of real data (the benchmark disk at 0, another 2 GiB of /usr data at 40 GiB; cached), for peak RSS:
  ``fleece-full-64g``, ``fleece-inc-64g`` (after a small change through the VM),
  ``fleece-restore-flat-64g``, ``fleece-restore-chain-64g`` (local, encrypted), and with the RGW
  ``fleece-full-64g-s3``, ``fleece-restore-flat-64g-s3``; every restore is compared with the VM's image

Every fleece command unlocks the encrypted repositories with a key file (``FLEECE_KEY_FILE``, :data:`FLEECE_ENV`:
what scheduled backups on a hypervisor use; HKDF, microseconds), so the encryption rows price sealing and
opening the data. A password slot adds its scrypt to every command, a fixed cost whatever the data size:
``fleece-list-password`` (a slot of the default 0.5 s) against ``fleece-list-keyfile`` measures it.

S3 request counts are read from RGW's own access log, the same way for fleece and restic.

Each command case runs under ``/usr/bin/time`` for wall time, CPU time and peak RSS. Raw results go to
``bench-results/<stamp>.jsonl``; a Markdown table and the ratios against the targets go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import nbd  # noqa: E402
import zstandard  # noqa: E402

from benchlib.corpus import CACHE  # noqa: E402
from benchlib.disk import apply_raw, build_disk, change, data_ranges  # noqa: E402
from benchlib.images import (SPARSE_CLUSTER, SPARSE_CLUSTERS, allocated_bytes, build_big_disk,  # noqa: E402
                             build_sparse_disk, same_disk)
from benchlib.vm import BenchVM  # noqa: E402
from fleece.repository import KIND_FULL, KIND_INCREMENTAL, RepoConfig, Repository  # noqa: E402
from fleece.repository.credentials import PASSWORD_VARIABLES, Credential, key_file  # noqa: E402
from fleece.repository.pack import pack_name  # noqa: E402

FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20
CHUNK = 4 * MiB

#: What every fleece command of the benchmark runs with: a key file (what a hypervisor's scheduled backups
#: use: HKDF, it unlocks in microseconds), so that the encryption rows price sealing and opening the data.
#: A passphrase slot adds its scrypt to every command, whatever the data size: measured on its own
#: (``fleece-list-password`` against ``fleece-list-keyfile``, with a slot of the default 0.5 s).
BENCH_KEY_FILE = CACHE / "bench.key"
FLEECE_ENV = {"FLEECE_KEY_FILE": str(BENCH_KEY_FILE)}
BENCH_PASSWORD = "bench"


def bench_key() -> Credential:
    """The benchmark's key file (made once, 0600), as ``Repository.open`` inside this process takes it."""
    if not BENCH_KEY_FILE.exists():
        BENCH_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(BENCH_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(64))
        os.close(fd)
    return key_file(str(BENCH_KEY_FILE), "bench key file")


def fleece_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """*base* (default: this process's environment) with :data:`FLEECE_ENV`, and without the other
    credential variables a user's shell may carry — fleece refuses two password sources at once."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in PASSWORD_VARIABLES and k != "FLEECE_KEY_FILE"}
    env.update(FLEECE_ENV)
    return env


@dataclass
class Result:
    case: str
    rep: int
    wall_s: float
    cpu_s: float | None = None
    rss_mib: float | None = None
    bytes_in: int | None = None  # bytes of disk data the case processed
    bytes_stored: int | None = None  # repository growth
    bytes_sent: int | None = None  # bytes written to the repository / over the wire
    requests: int | None = None  # S3 requests (where measured)
    extra: dict = field(default_factory=dict)


def timed(cmd: list[str], env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run *cmd* (in *cwd*) under /usr/bin/time; returns the process and {wall_s, cpu_s, rss_mib}."""
    fmt = "FLEECEBENCH %e %U %S %M"
    subprocess.run(["sync"], check=True)  # start every case without another case's dirty pages to write back
    p = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    line = next((ln for ln in p.stderr.splitlines() if ln.startswith("FLEECEBENCH")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    _, e, u, s, m = line.split()
    return p, {"wall_s": float(e), "cpu_s": float(u) + float(s), "rss_mib": int(m) / 1024}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def cells_with_data(raw: Path, size: int) -> list[int]:
    """Offsets of the 4 MiB cells of *raw* that hold data (what a full backup compresses)."""
    fd = os.open(raw, os.O_RDONLY)
    cells, pos = set(), 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            cells.update(range(start // CHUNK * CHUNK, end, CHUNK))
            pos = end
    finally:
        os.close(fd)
    return sorted(cells)


def _on_threads(work: Callable[[int], None], threads: int) -> tuple[float, float]:
    """Run ``work(i)`` for i in range(threads) on as many threads; wall and CPU seconds taken."""
    t0, c0 = time.perf_counter(), time.process_time()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, time.process_time() - c0


def zstd_limit(raw: Path, offsets: list[int], level: int) -> Result:
    """One compressor per core over the same cells (page cache warm): the CPU limit of a full."""
    threads = os.cpu_count() or 1
    stored = [0] * threads
    nonzero = [0] * threads

    def work(i: int) -> None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        fd = os.open(raw, os.O_RDONLY)
        for off in offsets[i::threads]:
            data = os.pread(fd, CHUNK, off)
            if data.count(0) != len(data):
                stored[i] += len(c.compress(data))
                nonzero[i] += len(data)
        os.close(fd)

    wall, cpu = _on_threads(work, threads)
    return Result("zstd-limit", 0, wall, cpu, None, sum(nonzero),
                  sum(stored), None, extra={"threads": threads, "level": level})


def sha256_limit(raw: Path, offsets: list[int]) -> Result:
    import hashlib

    threads = os.cpu_count() or 1

    def work(i: int) -> None:
        fd = os.open(raw, os.O_RDONLY)
        for off in offsets[i::threads]:
            hashlib.sha256(os.pread(fd, CHUNK, off)).digest()
        os.close(fd)

    wall, cpu = _on_threads(work, threads)
    return Result("sha256-limit", 0, wall, cpu,
                  bytes_in=len(offsets) * CHUNK)


class Rgw:
    """One Ceph RGW for the whole benchmark run; counts requests from its access log."""

    def __init__(self, directory: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        import s3_server

        self._mod = s3_server
        self.dir = directory
        shutil.rmtree(directory, ignore_errors=True)
        self.info = s3_server.start(directory, backend="bluestore")
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=self.info["access_key"],
                        AWS_SECRET_ACCESS_KEY=self.info["secret_key"], AWS_ENDPOINT_URL_S3=self.info["endpoint"])
        self._log = directory / "log" / "ceph-client.rgw.a.log"
        self._pos = 0

    def requests(self) -> dict[str, int]:
        """Requests (by method) since the last call."""
        counts: dict[str, int] = {}
        with open(self._log, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos += len(chunk)
        for line in chunk.split(b"\n"):
            if b" beast: " in line and b'"' in line:
                method = line.split(b'"', 2)[1].split(b" ", 1)[0].decode()
                counts[method] = counts.get(method, 0) + 1
        return counts

    def _client(self):  # noqa: ANN202 - a boto3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.info["endpoint"], aws_access_key_id=self.info["access_key"],
                            aws_secret_access_key=self.info["secret_key"], region_name="us-east-1")

    def bucket_bytes(self, bucket: str) -> int:
        total = 0
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def create_bucket(self, bucket: str) -> None:
        self._client().create_bucket(Bucket=bucket)

    def delete_bucket(self, bucket: str) -> None:
        """Empty and remove *bucket*: the OSD's 8 GiB bluestore fills up (HEALTH_ERR, every PUT refused)
        within one ``--reps 3`` run if the repetitions' buckets stay."""
        client = self._client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=bucket)
        except client.exceptions.NoSuchBucket:
            pass

    def server_cpu(self) -> float:
        """CPU seconds the Ceph daemons (mon, OSD, radosgw) have used so far. They share this machine's
        cores with the client, so a case against RGW pays for the server too: the rows report it."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.info["pids"].values():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        return total

    def stop(self) -> None:
        self._mod.stop(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def plain_read(uri: str, extents: list[tuple[int, int]], workers: int = 4) -> Result:
    """libnbd reads of exactly *extents* (1 MiB requests over *workers* connections): no hash, no zstd."""
    pieces = [(o + i, min(MiB, n - i)) for o, n in extents for i in range(0, n, MiB)]
    t0 = time.perf_counter()

    def work(mine: list[tuple[int, int]]) -> None:
        h = nbd.NBD()
        h.connect_uri(uri)
        for off, n in mine:
            h.pread(n, off)
        h.shutdown()

    ts = [threading.Thread(target=work, args=(pieces[i::workers],)) for i in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return Result("plain-read", 0, time.perf_counter() - t0, bytes_in=sum(n for _, n in pieces))


def fleece_json(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[dict, dict]:
    """Run ``fleece ARGS --json`` under /usr/bin/time (with :func:`fleece_env` over *env*): its JSON
    document and the timings."""
    p, t = timed([FLEECE, *args, "--json"], env=fleece_env(env), cwd=cwd)
    return json.loads(p.stdout), t


def backup_case(case: str, rep: int, qmp: str, target: str, kind: str, scratch: Path, rgw: Rgw | None,
                env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> tuple[Result, dict]:
    """One timed ``fleece backup`` of the VM at *qmp* to *target*; fails unless the point (and its disk)
    is a *kind* — a full where an incremental was meant would measure the wrong thing silently."""
    def stored() -> int:
        if target.startswith("s3://"):
            assert rgw is not None
            return rgw.bucket_bytes(target[5:].split("/")[0])
        return du(Path(target))

    before = stored()
    if rgw is not None:
        rgw.requests()
        server = rgw.server_cpu()
    doc, t = fleece_json(["backup", "--qmp", qmp, "--repo", target, "--scratch", str(scratch), *flags], env)
    if rgw is not None and target.startswith("s3://"):
        t["extra_server_cpu_s"] = rgw.server_cpu() - server
    after = stored()
    st = doc["disks"]["vda"]
    if doc["kind"] != kind or st["kind"] != kind:
        raise RuntimeError(f"{case}: expected a {kind} backup of {target}, got point {doc['kind']} / "
                           f"disk vda {st['kind']}")
    server_cpu = t.pop("extra_server_cpu_s", None)
    r = Result(case, rep, **t, bytes_in=st["read_bytes"], bytes_stored=after - before,
               bytes_sent=doc["uploaded_bytes"],
               extra={"pause_ms": doc["pause_ms"], "dirty_bytes": st["dirty_bytes"], "zero_bytes": st["zero_bytes"],
                      "id": doc["id"]})
    if server_cpu is not None:
        r.extra["server_cpu_s"] = round(server_cpu, 3)
    if "audit" in st:  # the bitmap audit's own cost, inside the incremental's time
        r.extra.update(audit_s=st["audit"]["seconds"], audit_bytes=st["audit"]["bytes_read"])
    if target.startswith("s3://") and rgw is not None:
        r.requests = sum(rgw.requests().values())
        r.extra["puts"] = doc["backend_requests"].get("PUT", 0)
    return r, doc


def restore_case(case: str, rep: int, repo: str, dst: Path, flags: list[str],
                 env: dict[str, str] | None = None, rgw: Rgw | None = None, **extra: object) -> tuple[Result, dict]:
    """One timed ``fleece restore`` of the VM's last point into *dst*, with the bytes it fetched; with
    *rgw*, its GET requests as RGW logged them (``extra["gets"]``: RGW logs bucket listings as GETs too,
    so it can exceed fleece's own count, ``extra["client_gets"]``)."""
    if rgw is not None:
        rgw.requests()
        server = rgw.server_cpu()
    doc, t = fleece_json(["restore", "--repo", repo, "--vm", "benchvm", "--out", str(dst), *flags], env)
    st = doc["disks"]["vda"]
    r = Result(case, rep, **t, bytes_in=st.get("data_bytes"), extra=dict(extra, point=doc["point"]))
    if rgw is not None:
        r.extra["server_cpu_s"] = round(rgw.server_cpu() - server, 3)
    if "fetched_bytes" in st:
        r.extra["fetched_bytes"] = st["fetched_bytes"]
    if rgw is not None:
        counts = rgw.requests()
        r.requests = sum(counts.values())
        r.extra["gets"] = counts.get("GET", 0)
        r.extra["client_gets"] = doc.get("backend_requests", {}).get("GET")
    return r, doc


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment replaced by *env* for a while (the S3 backend reads its endpoint and
    keys from there, as the fleece command does)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def needed_pack_bytes(url: str, env: dict[str, str] | None = None, vm: str = "benchvm") -> int:
    """Stored bytes of the packs whose blobs the flat view of *vm*'s last point (disk vda) reads: what a
    restore would fetch if it read whole packs."""
    with environment(env or dict(os.environ)), Repository.open(url, credential=bench_key()) as repo:
        last = repo.latest(vm)
        assert last is not None
        packs = {repo.locate(p.blob).pack for p in repo.resolve(last, "vda") if p.blob is not None}
        sizes = {info.name: info.size for info in repo.backend.list("data/")}
    return sum(sizes[pack_name(p)] for p in packs)


def peer(name: str, rep: int, cmd: list[str], repo_bytes, env: dict[str, str] | None = None,
         rgw: Rgw | None = None, data: int | None = None) -> Result:
    before = repo_bytes()
    if rgw is not None:
        rgw.requests()
    p, t = timed(cmd, env=env)
    grown = repo_bytes() - before
    r = Result(name, rep, **t, bytes_in=data, bytes_stored=grown, bytes_sent=grown)
    if rgw is not None:
        r.requests = sum(rgw.requests().values())
    return r


def one_rep(rep: int, qcow2: Path, raw: Path, work: Path, incs: int, rgw: Rgw | None,
            peers: bool) -> list[Result]:
    out: list[Result] = []
    disk = work / "disk.qcow2"
    shutil.copyfile(qcow2, disk)
    twin = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(twin)], check=True)
    size = os.path.getsize(raw)
    level = RepoConfig().compression["level"]
    repo = work / "repo"  # encrypted (format 2): what `fleece backup` makes on first use
    plain_repo = work / "repo-plain"  # plaintext (format 1) twin, from `fleece init --no-encryption`
    s3repo = f"s3://bench-{rep}-{os.getpid()}/fleece"
    restic_local = work / "restic"
    borg_repo = work / "borg"
    restic_s3 = f"s3:{rgw.info['endpoint']}/restic-{rep}-{os.getpid()}" if rgw else ""
    penv = dict(rgw.env if rgw else os.environ, RESTIC_PASSWORD="bench", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                RESTIC_CACHE_DIR=str(work / "restic-cache"), BORG_BASE_DIR=str(work / "borg-home"))

    def fleece_backup(case: str, target: str, kind: str, env: dict[str, str] | None = None) -> dict:
        """:func:`backup_case` of this repetition's VM, its row kept."""
        r, doc = backup_case(case, rep, vm.qmp, target, kind, work, rgw, env)
        out.append(r)
        return doc

    # The encrypted/plaintext twins swap places every other repetition: the order alone moved the ratios
    # by more than the 5 % they are held to (flat restores, encrypted / plaintext: 0.82 encrypted-first,
    # 1.15 plaintext-first, one --quick --reps 3 run each), so a fixed order would bias the ratio rows.
    plain_first = rep % 2 == 1
    order = "plaintext-first" if plain_first else "encrypted-first"

    def twin_backups(enc_case: str, plain_case: str, kind: str) -> tuple[dict, dict]:
        """The same backup to the encrypted and the plaintext repository, back to back (nothing writes
        to the disk in between); returns (encrypted document, plaintext document)."""
        pair = [(enc_case, repo), (plain_case, plain_repo)]
        docs = {}
        for case, target in reversed(pair) if plain_first else pair:
            docs[case] = fleece_backup(case, str(target), kind)
            out[-1].extra["twin_order"] = order
        return docs[enc_case], docs[plain_case]

    def peers_backup(kind: str) -> None:
        if not peers:
            return
        if kind == "full":
            subprocess.run(["restic", "-q", "-r", str(restic_local), "init"], env=penv, check=True,
                           capture_output=True)
            subprocess.run(["borg", "init", "-e", "none", str(borg_repo)], env=penv, check=True, capture_output=True)
            if rgw is not None:
                subprocess.run(["restic", "-q", "-r", restic_s3, "init"], env=penv, check=True, capture_output=True)
        out.append(peer(f"restic-{kind}", rep, ["restic", "-q", "-r", str(restic_local), "backup", "--host", "bench",
                                                str(twin)], lambda: du(restic_local), penv, data=size))
        if rgw is not None:
            bucket = restic_s3.rsplit("/", 1)[1]
            out.append(peer(f"restic-{kind}-s3", rep, ["restic", "-q", "-r", restic_s3, "backup", "--host", "bench",
                                                       str(twin)], lambda: rgw.bucket_bytes(bucket), penv, rgw, size))
        out.append(peer(f"borg-{kind}", rep, ["borg", "create", "--compression", "zstd,3", f"{borg_repo}::{kind}",
                                              str(twin)], lambda: du(borg_repo), penv, data=size))

    if rgw is not None:
        rgw.create_bucket(s3repo[5:].split("/")[0])
    subprocess.run([FLEECE, "init", "--no-encryption", "--repo", str(plain_repo)], env=fleece_env(), check=True,
                   capture_output=True)
    vm = BenchVM(work, {"vda": disk})
    try:
        with vm.live_export("vda") as uri:
            p, t = timed(["nbdcopy", uri, "null:"])
            out.append(Result("nbdcopy", rep, **t, bytes_in=size))
        cells = cells_with_data(twin, size)
        r = zstd_limit(twin, cells, level)
        r.rep = rep
        out.append(r)
        r = sha256_limit(twin, cells)
        r.rep = rep
        out.append(r)

        # Nothing writes to the disk between these fulls: both repositories start from the same state.
        doc, plain = twin_backups("fleece-full", "fleece-full-plain", KIND_FULL)
        points, plain_points = [doc["id"]], [plain["id"]]
        with Repository.open(str(repo), credential=bench_key()) as r_enc, \
                Repository.open(str(plain_repo)) as r_plain:
            if not r_enc.encrypted or r_plain.encrypted:  # the twins must differ in exactly this
                raise RuntimeError(f"{repo} should be encrypted and {plain_repo} not: got "
                                   f"{r_enc.encrypted} / {r_plain.encrypted}")
        s3_points = 0
        if rgw is not None:
            fleece_backup("fleece-full-s3", s3repo, KIND_FULL, rgw.env)
            s3_points += 1
        peers_backup("full")
        for i in range(incs):
            ops = change(qcow2, seed=1000 * rep + i)  # layout of the pristine image (not in use)
            vm.apply("vda", ops)
            apply_raw(twin, ops)
            # The plaintext chain follows every change too (its own bitmap, since its own full): its
            # incremental covers the same change, and its last point is the same disk as the encrypted one's.
            doc, plain = twin_backups("fleece-inc" if i == 0 else "fleece-inc-more",
                                      "fleece-inc-plain" if i == 0 else "fleece-inc-more-plain", KIND_INCREMENTAL)
            points.append(doc["id"])
            plain_points.append(plain["id"])
            if plain["disks"]["vda"]["dirty_bytes"] != doc["disks"]["vda"]["dirty_bytes"]:
                raise RuntimeError(f"change {i}: the plaintext incremental saw {plain['disks']['vda']['dirty_bytes']} "
                                   f"dirty bytes, the encrypted one {doc['disks']['vda']['dirty_bytes']}: they "
                                   "do not cover the same change")
            if rgw is not None:  # every change: the RGW chain restores the same disk as the local one
                fleece_backup("fleece-inc-s3" if i == 0 else "fleece-inc-more-s3", s3repo, KIND_INCREMENTAL,
                              rgw.env)
                s3_points += 1
            if i == 0:
                with Repository.open(str(repo), credential=bench_key()) as r_enc:
                    m = r_enc.manifest("benchvm", doc["id"])
                extents = [(o, n) for o, n, b in m.disks["vda"].extents if b is not None]
                with vm.live_export("vda") as uri:
                    r = plain_read(uri, extents)
                r.rep = rep
                c = zstandard.ZstdCompressor(level=level)
                fd = os.open(twin, os.O_RDONLY)
                r.extra["dirty_zstd_bytes"] = sum(len(c.compress(os.pread(fd, n, o))) for o, n in extents)
                os.close(fd)
                out.append(r)
                peers_backup("inc")
    finally:
        vm.quit()

    plain_flat = work / "restore-flat-plain"
    restores = [("fleece-restore-chain", repo, work / "restore-chain", [], len(points)),
                ("fleece-restore-flat", repo, work / "restore-flat", ["--flat"], len(points)),
                ("fleece-restore-flat-plain", plain_repo, plain_flat, ["--flat"], len(plain_points))]
    if plain_first:  # the flat twins swap places (see plain_first); the chain restore stays first
        restores[1], restores[2] = restores[2], restores[1]
    flat_data = 0  # disk data of the last point (the encrypted flat restore's): the verify rows' fallback
    for case, source, dst, flags, layers in restores:
        r, doc = restore_case(case, rep, str(source), dst, flags, layers=layers, twin_order=order)
        out.append(r)
        if doc["point"] != (plain_points if source == plain_repo else points)[-1]:
            raise RuntimeError(f"{case} restored point {doc['point']}, not the last one")
        if case == "fleece-restore-flat":
            flat_data = r.bytes_in or 0
    if rgw is not None:
        dst = work / "restore-s3"
        r, doc = restore_case("fleece-restore-flat-s3", rep, s3repo, dst, ["--flat"], rgw.env, rgw, layers=s3_points)
        r.extra["pack_bytes"] = needed_pack_bytes(s3repo, rgw.env)
        out.append(r)
        if rep == 0:  # the RGW chain followed every change: its last point is the VM's disk too
            same_disk(dst / "vda.qcow2", twin, "raw")
        shutil.rmtree(dst)
    chain_top = work / "restore-chain" / "vda.qcow2"
    if rep == 0:  # correctness of the benchmark itself: every local restore equals the VM's disk
        for img in (chain_top, work / "restore-flat" / "vda.qcow2", plain_flat / "vda.qcow2"):
            cmp = subprocess.run(["qemu-img", "compare", "-F", "raw", str(img), str(twin)], capture_output=True,
                                 text=True)
            if cmp.returncode != 0:
                raise RuntimeError(f"benchmark restore {img} differs from the source: {cmp.stdout}")
    # Unlocking: the same `fleece list` with a default (0.5 s) password slot and with the key file.
    if rep == 0:
        subprocess.run([FLEECE, "key", "add", "--repo", str(repo), "--label", "bench password"],
                       env=dict(fleece_env(), FLEECE_NEW_PASSWORD=BENCH_PASSWORD, FLEECE_KDF_TIME="500"), check=True,
                       capture_output=True)
        for case, env in (("fleece-list-keyfile", fleece_env()),
                          ("fleece-list-password", {**{k: v for k, v in fleece_env().items() if k != "FLEECE_KEY_FILE"},
                                                    "FLEECE_PASSWORD": BENCH_PASSWORD})):
            p, t = timed([FLEECE, "list", "--repo", str(repo), "--json"], env=env)
            if p.returncode != 0:
                raise RuntimeError(f"{case}: {p.stderr}")
            out.append(Result(case, rep, **t))
    converted = work / "converted.qcow2"
    p, t = timed(["qemu-img", "convert", "-O", "qcow2", str(chain_top), str(converted)])
    out.append(Result("qemu-img-convert", rep, **t, extra={"layers": len(points)}))
    converted.unlink()
    out += verify_cases(rep, str(repo), points[-1], flat_data, work)
    out += serve_cases(rep, str(repo), disk, work, flat_data)
    if rgw is not None:
        out += serve_cases(rep, s3repo, disk, work, flat_data, rgw.env, "-s3")
    # The VM quit: its image is the last point's disk (the restores equal the twin, and so does it).
    if rep == 0:
        same_disk(disk, twin, "raw")
    out += flat_convert_cases(rep, disk, work / "converted-flat.qcow2")  # drops the page cache: keep last
    # The drop evicted fleece's own code (and boto3's) too: read it back in, untimed, so that the next
    # repetition's first fleece command does not pay for it.
    for target, env in [(str(repo), None)] + ([(s3repo, rgw.env)] if rgw is not None else []):
        subprocess.run([FLEECE, "list", "--repo", target, "--json"], env=fleece_env(env), check=True,
                       capture_output=True)
    if rgw is not None:
        out.append(s3_client_start(rep, rgw))
        rgw.delete_bucket(s3repo[5:].split("/")[0])
        if peers:
            rgw.delete_bucket(restic_s3.rsplit("/", 1)[1])
    return out


def s3_client_start(rep: int, rgw: Rgw) -> Result:
    """The fixed cost every fleece command against S3 pays before its first request: a Python process
    that imports boto3 and builds the client the S3 backend builds. The RGW/local ratio of a short run
    (an incremental) cannot go below what this adds to it."""
    code = ("import boto3; from botocore.config import Config; s = boto3.session.Session(); "
            "s.client('s3', config=Config(s3={'addressing_style': 'path'}), region_name=s.region_name or 'us-east-1')")
    p, t = timed([str(ROOT / ".venv" / "bin" / "python"), "-c", code], env=rgw.env)
    return Result("s3-client-start", rep, **t)


def verify_cases(rep: int, repo: str, point: str, data_bytes: int, work: Path) -> list[Result]:
    """``fleece verify --point --read-data`` and ``fleece restore --flat --verify-only`` of *point* (the
    last one), each checked to have read that point and (verify-only) to have written nothing. Their MB/s
    is their own report's; where a report lacks it (an older fleece), the restored disk data over wall."""
    out = []
    doc, t = fleece_json(["verify", "--repo", repo, "--vm", "benchvm", "--point", point, "--read-data"])
    ids = [p["id"] for p in doc["points"]]
    if not doc["ok"] or point not in ids or not doc.get("blobs_checked"):
        raise RuntimeError(f"fleece-verify-point: verify of {point} says ok={doc['ok']}, points {ids}, "
                           f"{doc.get('blobs_checked')} blobs read")
    plain = doc.get("plain_bytes") or doc.get("bytes_read") or data_bytes  # bytes_read: decoded, as plain
    out.append(Result("fleece-verify-point", rep, **t, bytes_in=plain,
                      extra={"mb_per_s": doc.get("mb_per_s") or round(data_bytes / 1e6 / t["wall_s"], 1),
                             "mb_per_s_reported": "mb_per_s" in doc, "bytes_read": doc.get("bytes_read"),
                             "seconds": doc.get("seconds"), "blobs": doc["blobs_checked"]}))
    empty = work / "verify-only-cwd"  # where a restore without --out would write: must stay empty
    empty.mkdir()
    doc, t = fleece_json(["restore", "--repo", repo, "--vm", "benchvm", "--flat", "--verify-only"], cwd=empty)
    if doc.get("verify_only") is not True or doc["point"] != point or any(empty.iterdir()):
        raise RuntimeError(f"fleece-restore-verify-only: got verify_only={doc.get('verify_only')}, point "
                           f"{doc['point']} (want {point}), wrote {sorted(x.name for x in empty.iterdir())}")
    empty.rmdir()
    plain = sum(d.get("plain_bytes", 0) for d in doc["disks"].values()) or data_bytes
    out.append(Result("fleece-restore-verify-only", rep, **t, bytes_in=plain,
                      extra={"mb_per_s": doc.get("mb_per_s") or round(data_bytes / 1e6 / t["wall_s"], 1),
                             "mb_per_s_reported": "mb_per_s" in doc, "seconds": doc.get("seconds"),
                             "fetched_bytes": doc["disks"]["vda"].get("fetched_bytes")}))
    return out


def serve_cases(rep: int, repo: str, disk: Path, work: Path, data: int, env: dict[str, str] | None = None,
                suffix: str = "") -> list[Result]:
    """``fleece serve`` of the last point: seconds from starting the command to the answer of a first 4 KiB
    read of data (what a booting VM waits for), then ``nbdcopy`` of the whole export to ``null:`` (its
    sequential read rate, holes skipped by block status), and the server's peak RSS (nbdkit's, which
    holds the cache). With no suffix also the baseline: ``nbdcopy`` of the local qcow2 holding the same
    disk (through qemu-nbd)."""
    out: list[Result] = []
    sock = work / f"serve{suffix}.sock"
    subprocess.run(["sync"], check=True)
    started = time.monotonic()
    proc = subprocess.Popen([FLEECE, "serve", "--repo", repo, "--vm", "benchvm", "--socket", str(sock), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleece_env(env))
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleece serve failed: {proc.stderr.read()[-2000:]}")
        doc = json.loads(line)
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(doc["default"])
        first: list[int] = []

        def found(meta: str, offset: int, entries: list[int], err: int) -> int:
            at = offset
            for i in range(0, len(entries), 2):
                if not entries[i + 1] & nbd.STATE_HOLE and not first:
                    first.append(at)
                at += entries[i]
            return 0
        pos = 0
        while not first and pos < h.get_size():
            h.block_status(min(1 << 30, h.get_size() - pos), pos, found)
            pos += 1 << 30
        h.pread(4096, first[0] if first else 0)
        ttfb = time.monotonic() - started
        h.shutdown()
        p, t = timed(["nbdcopy", "--connections=4", doc["default"], "null:"])
        status = Path(f"/proc/{doc['pid']}/status").read_text()
        hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:"))
        out.append(Result(f"fleece-serve-first-byte{suffix}", rep, wall_s=round(ttfb, 3)))
        # rss_mib: the server's (nbdkit with the plugin), not nbdcopy's; bytes_in: the point's data
        out.append(Result(f"fleece-serve-nbdcopy{suffix}", rep, wall_s=t["wall_s"], rss_mib=hwm / 1024,
                          bytes_in=data, extra={"nbdcopy_cpu_s": t["cpu_s"]}))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not suffix:
        p, t = timed(["nbdcopy", "--connections=4", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(disk), "]",
                      "null:"])
        out.append(Result("nbdcopy-qcow2", rep, **t))
    return out


def flat_convert_cases(rep: int, source: Path, dst: Path) -> list[Result]:
    """Issue #13's baseline of a flat restore: ``qemu-img convert -O qcow2`` of one local qcow2 (*source*,
    the disk the restored point holds), its source warm (read once just before) and cold (after dropping
    the page cache: the caller runs this last, so the drop costs no later case anything)."""
    out = []
    data = allocated_bytes(source)
    for case in ("qemu-img-convert-warm", "qemu-img-convert-cold"):
        if case.endswith("warm"):
            subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)
        else:
            subprocess.run(["sync"], check=True)
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError as e:  # not root: no cold row rather than a warm one under a cold name
                print(f"skipping {case}: cannot drop the page cache ({e})", file=sys.stderr, flush=True)
                continue
        p, t = timed(["qemu-img", "convert", "-O", "qcow2", str(source), str(dst)])
        out.append(Result(case, rep, **t, bytes_in=data, extra={"layers": 1}))
        dst.unlink()
    return out


def uncovered(ranges: list[tuple[int, int]], cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (offset, length) *ranges* not wholly inside one range of *cover* (both sorted, disjoint)."""
    missed, j = [], 0
    for off, n in ranges:
        while j < len(cover) and cover[j][0] + cover[j][1] <= off:
            j += 1
        if j == len(cover) or not cover[j][0] <= off <= off + n <= cover[j][0] + cover[j][1]:
            missed.append((off, n))
    return missed


def sparse_cases(runs: int = 3) -> list[Result]:
    """``fleece-full-sparse-1t``: *runs* fulls (rep 0..) of the cached 1 TiB disk with 2,000 scattered
    64 KiB clusters, each to a fresh local repository (a full into one already holding the data would
    dedupe, not back up); each point must hold every cluster as data, and of the holes only the small
    ones a blob may span."""
    src = build_sparse_disk()
    clusters = data_ranges(src)
    allocated = sum(n for _, n in clusters)
    if allocated != SPARSE_CLUSTERS * SPARSE_CLUSTER:
        raise RuntimeError(f"{src}: {allocated} bytes allocated, not {SPARSE_CLUSTERS} x {SPARSE_CLUSTER}")
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-sparse-", dir=CACHE))
    out = []
    try:
        disk = work / "sparse.qcow2"
        shutil.copyfile(src, disk)  # the backups add their bitmaps to the image: keep the cached one clean
        vm = BenchVM(work, {"vda": disk})
        try:
            for i in range(runs):
                repo = work / f"repo-{i}"
                r, doc = backup_case("fleece-full-sparse-1t", i, vm.qmp, str(repo), KIND_FULL, work, None,
                                     flags=("--full",))
                with Repository.open(str(repo), credential=bench_key()) as opened:
                    m = opened.manifest("benchvm", doc["id"])
                stored = [(o, n) for o, n, blob in m.disks["vda"].extents if blob is not None]
                data = sum(n for _, n in stored)
                missed = uncovered(clusters, stored)
                # A blob may span a small hole between two clusters (fleece's SPARSE_GAP), never much more.
                if missed or not allocated <= data <= allocated * 1.05:
                    raise RuntimeError(f"fleece-full-sparse-1t: the point holds {data} bytes of data for "
                                       f"{allocated} allocated; {len(missed)} clusters not in it")
                r.extra["data_bytes"] = data
                out.append(r)
                shutil.rmtree(repo)
        finally:
            vm.quit()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


#: The small change before ``fleece-inc-64g``: ~0.1 % of the 64 GiB disk (~70 MB, ~1.6 % of its data) —
#: the main cases' ~3 % of the virtual size would be 2 GB here, half the data.
BIG_CHANGE = 0.001


def big_cases(rgw: Rgw | None) -> list[Result]:
    """The 64 GiB disk's cases (module docstring), once each: their peak RSS is the point. The S3 full
    runs after the incremental, so that every restore (local flat, local chain, from RGW) is of the
    same disk — the VM's image once it quit — and each is compared with it."""
    src = build_big_disk()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-64g-", dir=CACHE))
    out: list[Result] = []
    try:
        disk = work / "disk.qcow2"
        shutil.copyfile(src, disk)
        repo = str(work / "repo")
        s3repo = f"s3://bench-64g-{os.getpid()}/fleece"
        vm = BenchVM(work, {"vda": disk})
        try:
            r, _ = backup_case("fleece-full-64g", 0, vm.qmp, repo, KIND_FULL, work, None)
            out.append(r)
            vm.apply("vda", change(src, seed=64, fraction=BIG_CHANGE))  # layout of the cached image (not in use)
            r, doc = backup_case("fleece-inc-64g", 0, vm.qmp, repo, KIND_INCREMENTAL, work, None)
            if not doc["disks"]["vda"]["dirty_bytes"]:
                raise RuntimeError("fleece-inc-64g: the incremental saw no change")
            out.append(r)
            if rgw is not None:
                rgw.create_bucket(s3repo[5:].split("/")[0])
                r, _ = backup_case("fleece-full-64g-s3", 0, vm.qmp, s3repo, KIND_FULL, work, rgw, rgw.env)
                out.append(r)
        finally:
            vm.quit()
        restores = [("fleece-restore-flat-64g", repo, ["--flat"], None),
                    ("fleece-restore-chain-64g", repo, [], None)]
        if rgw is not None:
            restores.append(("fleece-restore-flat-64g-s3", s3repo, ["--flat"], rgw))
        for case, source, flags, via in restores:
            dst = work / case
            r, _ = restore_case(case, 0, source, dst, flags, via.env if via else None, via,
                                layers=1 if via else 2)  # the RGW holds one full of the final disk
            out.append(r)
            same_disk(dst / "vda.qcow2", disk)  # after vm.quit(): the image holds the last point's disk
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


LIVE_FILES = 256  # 1 GiB


def live_cases(rgw: Rgw, reps: int = 3) -> list[Result]:
    """Instant recovery from RGW with a real guest (tests/guest.py: Debian's kernel, busybox, ext4 root on
    vda), *reps* times: a 1.5 GiB root filesystem holding :data:`LIVE_FILES` × 4 MiB of incompressible
    files is backed up to RGW once; then each repetition times

    * ``live-restore-s3``: from starting ``fleece live-restore`` to the guest's ``FLEECE-GUEST-WROTE`` (it
      booted, read its root, wrote) — ``wall_s`` — and to the stream's end (``extra["stream_done_s"]``);
    * ``restore-then-boot-s3``: a plain ``fleece restore --flat`` from RGW, then the guest booted from it,
      to the same console line (``extra["restore_s"]``: the restore alone).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    import guest  # tests/guest.py

    guest.build()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-live-", dir=CACHE))
    out: list[Result] = []
    bucket = f"bench-live-{os.getpid()}"
    s3repo = f"s3://{bucket}/fleece"
    try:
        # 1 GiB of incompressible files in a 1.5 GiB root: enough that a restore takes longer than a boot
        tree = work / "tree" / "data"
        tree.mkdir(parents=True)
        for i in range(LIVE_FILES):
            (tree / f"f{i:03d}").write_bytes(os.urandom(4 << 20))
        (work / "init").write_text(guest.MARKER_INIT)
        raw = work / "root.raw"
        subprocess.run([str(guest.TOOL), "rootfs", str(raw), "1536", str(work / "init"), str(work / "tree")],
                       check=True, capture_output=True)
        shutil.rmtree(work / "tree")
        root = work / "root.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(root)], check=True)
        raw.unlink()
        rgw.create_bucket(bucket)
        vm = BenchVM(work, {"vda": root})  # "benchvm", as restore_case expects
        try:
            fleece_json(["backup", "--qmp", vm.qmp, "--repo", s3repo, "--scratch", str(work)], rgw.env)
        finally:
            vm.quit()
        for rep in range(reps):
            d = work / f"live{rep}"
            started = time.monotonic()
            proc = subprocess.Popen([FLEECE, "live-restore", "--repo", s3repo, "--vm", "benchvm", "--out",
                                     str(d / "out"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=fleece_env(rgw.env))
            ready = json.loads(proc.stdout.readline() or "null") or {}
            if ready.get("stage") != "ready":
                raise RuntimeError(f"live-restore failed: {proc.stderr.read()[-2000:]}")
            g = guest.Guest(d / "g", [*ready["qemu_args"], "-device", ready["devices"]["vda"]], qmp=False)
            try:
                g.wait_for("FLEECE-GUEST-WROTE", timeout=300)
                runs = time.monotonic() - started
                if proc.wait(600) != 0:
                    raise RuntimeError(f"live-restore failed: {proc.stderr.read()[-2000:]}")
                done = json.loads(proc.stdout.readline())
                stream_done = time.monotonic() - started
            finally:
                g.stop()
            out.append(Result("live-restore-s3", rep, wall_s=round(runs, 3),
                              extra={"stream_done_s": round(stream_done, 3), "stream_s": done["stream_s"]}))
            started = time.monotonic()
            r, _ = restore_case("restore-then-boot-s3", rep, s3repo, d / "flat", ["--flat"], rgw.env, None)
            restore_s = time.monotonic() - started
            img = d / "flat" / "vda.qcow2"
            with guest.Guest(d / "g2", ["-drive", f"file={img},format=qcow2,if=none,id=d0",
                                        "-device", "virtio-blk-pci,drive=d0,id=vda"], qmp=False) as g2:
                g2.wait_for("FLEECE-GUEST-WROTE", timeout=300)
                total = time.monotonic() - started
            out.append(Result("restore-then-boot-s3", rep, wall_s=round(total, 3),
                              extra={"restore_s": round(restore_s, 3)}))
            shutil.rmtree(d, ignore_errors=True)
    finally:
        rgw.delete_bucket(bucket)
        shutil.rmtree(work, ignore_errors=True)
    return out


QUIESCE_INIT = r"""#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo FLEECE-GUEST-UP
@AGENT@
n=0
while :; do  # 64 KiB every ~0.1 s: a guest that keeps writing while it is backed up
  dd if=/dev/urandom of=/data/churn bs=65536 count=1 seek=$((n % 64)) conv=notrunc 2>/dev/null
  n=$((n + 1))
  [ $((n % 4)) -eq 0 ] && sync
  sleep 0.1
done
"""


def quiesce_cases(reps: int = 5) -> list[Result]:
    """What ``--quiesce`` costs, with a real guest running Debian's qemu-guest-agent (tests/guest.py) and
    writing all the time: *reps* incrementals each without (``fleece-inc-crash``) and with
    (``fleece-inc-quiesced``) the freeze, alternating, to a local repository. ``extra``: the guest's pause
    (``pause_ms``), the agent's freeze call (``freeze_ms``) and how long its filesystems stayed frozen
    (``frozen_ms``) — the numbers the guest's applications feel."""
    sys.path.insert(0, str(ROOT / "tests"))
    import guest  # tests/guest.py

    guest.build()
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-q-", dir="/var/tmp"))
    out: list[Result] = []
    try:
        root = guest.make_rootfs(work / "root.qcow2", QUIESCE_INIT.replace("@AGENT@", guest.AGENT_START),
                                 size_mib=256, agent=True)
        with guest.Guest(work / "g", ["-drive", f"file={root},format=qcow2,if=none,id=d0",
                                      "-device", "virtio-blk-pci,drive=d0,id=vda"], agent=True) as g:
            g.wait_for("FLEECE-AGENT-UP", timeout=120)
            time.sleep(3)  # the agent opens its port
            repo = str(work / "repo")
            base = ["backup", "--qmp", g.qmp_path, "--vm", "qbench", "--repo", repo, "--scratch", str(work)]
            fleece_json(base)
            for rep in range(reps):
                for case, extra in (("fleece-inc-crash", []),
                                    ("fleece-inc-quiesced", ["--quiesce", "--qga", g.qga_path])):
                    doc, t = fleece_json(base + extra)
                    if extra and doc.get("consistency") != "quiesced":
                        raise RuntimeError(f"--quiesce gave {doc.get('consistency')}: {doc.get('quiesce')}")
                    q = doc.get("quiesce") or {}
                    out.append(Result(case, rep, **t,
                                      extra={"pause_ms": doc.get("pause_ms"), "freeze_ms": q.get("freeze_ms"),
                                             "frozen_ms": q.get("frozen_ms")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def median(results: list[Result], case: str, attr: str) -> float | None:
    """The median of *attr* (a :class:`Result` field, or a key of its ``extra``) over *case*'s rows."""
    values = [v for r in results if r.case == case
              for v in [getattr(r, attr) if hasattr(r, attr) else r.extra.get(attr)] if v is not None]
    return statistics.median(values) if values else None


def report(results: list[Result], reps: int) -> str:
    cases = list(dict.fromkeys(r.case for r in results))
    lines = [f"| case (median of {reps}) | wall s | CPU s | peak RSS MiB | data MB | stored MB | sent MB | S3 requests |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v: float | None, scale: float = 1, digits: int = 2) -> str:
        return "–" if v is None else f"{v / scale:.{digits}f}"

    for c in cases:
        lines.append(f"| {c} | {f(median(results, c, 'wall_s'))} | {f(median(results, c, 'cpu_s'))} | "
                     f"{f(median(results, c, 'rss_mib'), digits=0)} | {f(median(results, c, 'bytes_in'), 1e6, 0)} | "
                     f"{f(median(results, c, 'bytes_stored'), 1e6, 1)} | {f(median(results, c, 'bytes_sent'), 1e6, 1)} | "
                     f"{f(median(results, c, 'requests'), digits=0)} |")
    m = lambda c, a="wall_s": median(results, c, a)  # noqa: E731
    lines.append("")
    checks = []
    if m("fleece-full") and m("zstd-limit"):
        checks.append(("full backup / zstd limit", m("fleece-full") / m("zstd-limit"), "≤ 1.30"))
    if m("fleece-inc") and m("plain-read"):
        checks.append(("incremental / (plain read of the same extents + 1 s)",
                       m("fleece-inc") / (m("plain-read") + 1), "≤ 1.50"))
        dz = statistics.median(r.extra["dirty_zstd_bytes"] for r in results if r.case == "plain-read")
        checks.append(("incremental bytes sent / zstd size of the dirty data", m("fleece-inc", "bytes_sent") / dz,
                       "≤ 1.10"))
    audits = [r.extra for r in results if r.case == "fleece-inc" and "audit_s" in r.extra]
    if audits:
        checks.append(("incremental: bitmap audit seconds (inside the incremental's wall time)",
                       statistics.median(a["audit_s"] for a in audits), "(info)"))
        checks.append(("incremental: bitmap audit MB read", statistics.median(a["audit_bytes"] for a in audits) / 1e6,
                       "(info)"))
    if m("fleece-restore-flat") and m("qemu-img-convert"):
        checks.append(("flat restore / qemu-img convert of the chain", m("fleece-restore-flat") / m("qemu-img-convert"),
                       "≤ 1.00"))
        checks.append(("chain restore / qemu-img convert of the chain",
                       m("fleece-restore-chain") / m("qemu-img-convert"), "(info)"))
    # Issue #13: against a flat copy of one local qcow2 holding the same disk (the VM's image).
    if m("fleece-restore-flat") and m("qemu-img-convert-warm"):
        checks.append(("flat restore / qemu-img convert (source warm)",
                       m("fleece-restore-flat") / m("qemu-img-convert-warm"), "≤ 1.00"))
    if m("fleece-restore-flat") and m("qemu-img-convert-cold"):
        checks.append(("flat restore / qemu-img convert (source cold)",
                       m("fleece-restore-flat") / m("qemu-img-convert-cold"), "(info)"))
    if m("fleece-restore-chain") and m("qemu-img-convert-warm"):
        checks.append(("chain restore / qemu-img convert (source warm)",
                       m("fleece-restore-chain") / m("qemu-img-convert-warm"), "≤ 1.20"))
    for case, what in (("fleece-verify-point", "verify --read-data of the last point"),
                       ("fleece-restore-verify-only", "restore --flat --verify-only of the last point")):
        speeds = [r.extra["mb_per_s"] for r in results if r.case == case]
        if speeds:
            checks.append((f"{what}: MB/s", statistics.median(speeds), "(info)"))
    if m("fleece-restore-verify-only") and m("fleece-restore-flat"):
        checks.append(("restore --verify-only / flat restore (wall)",
                       m("fleece-restore-verify-only") / m("fleece-restore-flat"), "(info)"))
    # Encryption's price: each encrypted case against its plaintext twin of the same repetition (same
    # disk state, same change, same chain length; unlocking at scrypt's floor, see the module docstring).
    for what, enc in (("full", "fleece-full"), ("incremental", "fleece-inc"), ("flat restore", "fleece-restore-flat")):
        if m(enc) and m(f"{enc}-plain"):
            checks.append((f"encryption cost: {what} encrypted / plaintext wall", m(enc) / m(f"{enc}-plain"),
                           "≤ 1.05"))
    for what, enc in (("full", "fleece-full"), ("incremental", "fleece-inc"), ("flat restore", "fleece-restore-flat")):
        if m(enc, "cpu_s") and m(f"{enc}-plain", "cpu_s"):
            checks.append((f"encryption cost: {what} encrypted / plaintext CPU seconds",
                           m(enc, "cpu_s") / m(f"{enc}-plain", "cpu_s"), "(info)"))
    if m("fleece-list-password") and m("fleece-list-keyfile"):
        checks.append(("unlocking with a default password slot instead of a key file, s per command",
                       m("fleece-list-password") - m("fleece-list-keyfile"), "(info)"))
    if m("fleece-full", "bytes_stored") and m("fleece-full-plain", "bytes_stored"):
        checks.append(("encryption cost: full stored encrypted / plaintext",
                       m("fleece-full", "bytes_stored") / m("fleece-full-plain", "bytes_stored"), "(info)"))
    for peer_name in ("restic", "restic-s3", "borg"):
        suffix = "-s3" if peer_name.endswith("-s3") else ""
        base = peer_name.replace("-s3", "")
        if m(f"{base}-full{suffix}") and m(f"fleece-full{suffix}"):
            checks.append((f"full: fleece{suffix} / {peer_name} wall", m(f"fleece-full{suffix}") / m(f"{base}-full{suffix}"),
                           "≤ 0.35" if base == "restic" else "(info)"))
        if m(f"{base}-inc{suffix}") and m(f"fleece-inc{suffix}"):
            checks.append((f"incremental: {peer_name} / fleece{suffix} wall (speed-up)",
                           m(f"{base}-inc{suffix}") / m(f"fleece-inc{suffix}"), "≥ 6"))
    if m("restic-full", "bytes_stored") and m("fleece-full", "bytes_stored"):
        checks.append(("full: fleece stored / restic stored", m("fleece-full", "bytes_stored") / m("restic-full", "bytes_stored"),
                       "≤ 1.00"))
    if m("fleece-full-s3") and m("fleece-full"):
        checks.append(("full: to RGW / to local (wall)", m("fleece-full-s3") / m("fleece-full"), "≤ 1.10"))
        checks.append(("full to RGW: CPU s the Ceph daemons spent on these 2 cores",
                       m("fleece-full-s3", "server_cpu_s"), "(info)"))
        checks.append(("incremental: to RGW / to local (wall)", m("fleece-inc-s3") / m("fleece-inc"), "≤ 1.10"))
        if m("s3-client-start"):
            checks.append(("incremental: RGW − local (s) / S3 client start (python + boto3 + client, s)",
                           (m("fleece-inc-s3") - m("fleece-inc")) / m("s3-client-start"), "(info)"))
        puts = statistics.median(r.extra["puts"] for r in results if r.case == "fleece-full-s3")
        gib = m("fleece-full-s3", "bytes_sent") / (1 << 30)
        checks.append(("full to RGW: PUT requests per GiB uploaded", puts / gib, "≤ 64"))
    if m("fleece-restore-flat-s3"):
        checks.append(("restore from RGW (flat), MB/s of disk data",
                       m("fleece-restore-flat-s3", "bytes_in") / 1e6 / m("fleece-restore-flat-s3"), "(info)"))
        if m("fleece-restore-flat"):
            checks.append(("restore from RGW / local flat restore (wall)",
                           m("fleece-restore-flat-s3") / m("fleece-restore-flat"), "≤ 1.20"))
        checks.append(("restore from RGW: CPU s the Ceph daemons spent on these 2 cores",
                       m("fleece-restore-flat-s3", "server_cpu_s"), "(info)"))
        s3r = [r.extra for r in results if r.case == "fleece-restore-flat-s3"]
        checks.append(("restore from RGW: GET requests", statistics.median(x["gets"] for x in s3r), "(info)"))
        ratios = [x["fetched_bytes"] / x["pack_bytes"] for x in s3r if x.get("fetched_bytes") and x.get("pack_bytes")]
        if ratios:
            checks.append(("restore from RGW: fetched / stored bytes (of the packs the point needs)",
                           statistics.median(ratios), "(info)"))
    if m("fleece-inc"):
        checks.append(("incremental on the bench disk (s)", m("fleece-inc"), "≤ 1.0"))
    if m("fleece-full-sparse-1t"):
        checks.append(("full of a 1 TiB sparse disk with 2,000 scattered 64 KiB clusters (s)",
                       m("fleece-full-sparse-1t"), "≤ 2.0"))
    if m("fleece-serve-nbdcopy"):
        mb = m("fleece-serve-nbdcopy", "bytes_in")
        checks.append(("serve: seconds from start to a first 4 KiB read of data (local)", m("fleece-serve-first-byte"),
                       "(info)"))
        checks.append(("serve: sequential read by nbdcopy, MB/s of the point's data (local)",
                       mb / 1e6 / m("fleece-serve-nbdcopy"), "(info)"))
        if m("nbdcopy-qcow2"):
            checks.append(("serve: nbdcopy of the export / nbdcopy of the local qcow2 (wall)",
                           m("fleece-serve-nbdcopy") / m("nbdcopy-qcow2"), "(info)"))
        if m("fleece-restore-flat"):
            checks.append(("serve: nbdcopy of the export / flat restore (wall)",
                           m("fleece-serve-nbdcopy") / m("fleece-restore-flat"), "(info)"))
        checks.append(("serve: peak RSS of the server (nbdkit + plugin, MiB)", m("fleece-serve-nbdcopy", "rss_mib"),
                       "(info)"))
    if m("fleece-serve-nbdcopy-s3"):
        checks.append(("serve from RGW: seconds from start to a first 4 KiB read of data",
                       m("fleece-serve-first-byte-s3"), "(info)"))
        checks.append(("serve from RGW: sequential read by nbdcopy, MB/s of the point's data",
                       m("fleece-serve-nbdcopy-s3", "bytes_in") / 1e6 / m("fleece-serve-nbdcopy-s3"), "(info)"))
    if m("live-restore-s3"):
        checks.append(("live restore from RGW: seconds until the guest runs (booted, wrote)", m("live-restore-s3"),
                       "(info)"))
        checks.append(("plain restore from RGW, then boot: seconds until the guest runs", m("restore-then-boot-s3"),
                       "(info)"))
        checks.append(("live restore from RGW: seconds until the stream is done (the image stands alone)",
                       m("live-restore-s3", "stream_done_s"), "(info)"))
        checks.append(("plain restore from RGW alone (s)", m("restore-then-boot-s3", "restore_s"), "(info)"))
    if m("fleece-inc-quiesced"):
        checks.append(("quiesce: guest filesystems frozen (ms, agent freeze answered → thawed)",
                       m("fleece-inc-quiesced", "frozen_ms"), "≤ 100"))
        checks.append(("quiesce: the agent's freeze call (ms)", m("fleece-inc-quiesced", "freeze_ms"), "(info)"))
        checks.append(("quiesce: guest pause (ms) quiesced / crash", m("fleece-inc-quiesced", "pause_ms")
                       / max(m("fleece-inc-crash", "pause_ms") or 1e-9, 1e-9), "(info)"))
        checks.append(("quiesce: seconds an incremental takes longer with it (the freeze call, the guard)",
                       m("fleece-inc-quiesced") - m("fleece-inc-crash"), "(info)"))
    # the memory target is for backups and restores; a password unlock's scrypt alone takes 128 MiB
    # (n = 2^17, r = 8: its cost is its memory) and verify holds a point's index, so they are shown apart
    moving = ("fleece-full", "fleece-inc", "fleece-restore")
    rss = max(r.rss_mib for r in results if r.case.startswith(moving) and r.rss_mib)
    checks.append(("peak RSS of any fleece backup or restore (MiB)", rss, "≤ 128"))
    others = [r for r in results if r.case.startswith("fleece") and not r.case.startswith(moving) and r.rss_mib]
    if others:
        top = max(others, key=lambda r: r.rss_mib)
        checks.append((f"peak RSS of any other fleece run (MiB; {top.case})", top.rss_mib, "(info)"))
    big_rss = [r.rss_mib for r in results if r.case.startswith("fleece") and "-64g" in r.case and r.rss_mib]
    if big_rss:
        checks.append(("peak RSS of any fleece run on the 64 GiB disk (MiB)", max(big_rss), "≤ 128"))
    peer_rss = [r.rss_mib for r in results if r.case.startswith(("restic", "borg")) and r.rss_mib]
    if peer_rss:
        checks.append(("peak RSS of restic/borg (MiB)", max(peer_rss), "(info)"))
    lines.append("| ratio | value | target |")
    lines.append("|---|---:|---|")
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in checks]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                    help="live restore from RGW with a real guest vs restore-then-boot (default: on, with the RGW)")
    ap.add_argument("--quiesce", action=argparse.BooleanOptionalAction, default=True,
                    help="--quiesce's cost with a real guest and its agent (default: on)")
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, 1 repetition, 2 incrementals (~2 minutes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"), help="directory for the JSON-lines results")
    ap.add_argument("--no-s3", action="store_true", help="skip the Ceph RGW cases")
    ap.add_argument("--no-peers", action="store_true", help="skip restic and borg")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                    help="the 64 GiB disk's memory cases, once (default: on; off with --quick)")
    ap.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                    help="the full of a 1 TiB sparse disk, 3 times (default: on, --quick too)")
    args = ap.parse_args()
    big = args.big if args.big is not None else not args.quick
    reps = args.reps or (1 if args.quick else 3)
    incs = 2 if args.quick else 5
    print(f"building / reusing the benchmark disk in {CACHE} ...", file=sys.stderr, flush=True)
    qcow2, raw = build_disk(quick=args.quick)
    bench_key()  # the key file every encrypted case unlocks with (FLEECE_ENV)
    results: list[Result] = []
    peers = not args.no_peers and all(shutil.which(t) for t in ("restic", "borg"))
    rgw = None if args.no_s3 else Rgw(CACHE / "rgw")
    try:
        for rep in range(reps):
            work = Path(tempfile.mkdtemp(prefix="fleece-bench-", dir=CACHE))
            try:
                print(f"repetition {rep + 1}/{reps} ...", file=sys.stderr, flush=True)
                results += one_rep(rep, qcow2, raw, work, incs, rgw, peers)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        if args.sparse:
            print("1 TiB sparse disk: 3 fulls ...", file=sys.stderr, flush=True)
            results += sparse_cases()
        if big:
            print(f"64 GiB disk: building / reusing it in {CACHE}, then its cases ...", file=sys.stderr, flush=True)
            results += big_cases(rgw)
        if args.quiesce:
            print("--quiesce with a real guest and qemu-guest-agent ...", file=sys.stderr, flush=True)
            results += quiesce_cases(3 if args.quick else 5)
        if rgw is not None and args.live:
            print("live restore from RGW with a real guest ...", file=sys.stderr, flush=True)
            results += live_cases(rgw, 1 if args.quick else 3)
    finally:
        if rgw is not None:
            rgw.stop()
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with open(Path(args.out) / f"{stamp}.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")
    size = os.path.getsize(raw)
    print(f"fleece benchmark {stamp}: {size >> 30} GiB qcow2 disk, ext4 with real /usr files "
          f"({qemu_data(qcow2) / 1e9:.2f} GB allocated), {os.cpu_count()} cores, {reps} repetition(s), "
          f"{incs} incrementals of ~3 %\n")
    print(report(results, reps))
    return 0


def qemu_data(qcow2: Path) -> int:
    out = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(qcow2)], capture_output=True,
                                    text=True, check=True).stdout)
    return sum(e["length"] for e in out if e["data"])


if __name__ == "__main__":
    sys.exit(main())
