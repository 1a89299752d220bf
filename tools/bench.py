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
* ``sha256-limit``   — the same cells hashed by one SHA-256 per core
* with a Ceph RGW (started here, bluestore): ``fleece-full-s3``, ``fleece-inc-s3``, ``fleece-restore-flat-s3``
  (encrypted)
* peers, on the raw twin of the disk (they back up files): ``restic-full``/``restic-inc`` (local repository,
  restic's defaults: compression auto, AES), ``restic-*-s3`` (same RGW), ``borg-full``/``borg-inc``
  (``--encryption=none --compression zstd,3``)

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import nbd  # noqa: E402
import zstandard  # noqa: E402

from benchlib.corpus import CACHE  # noqa: E402
from benchlib.disk import apply_raw, build_disk, change  # noqa: E402
from benchlib.vm import BenchVM  # noqa: E402
from fleece.repository import KIND_FULL, KIND_INCREMENTAL, RepoConfig, Repository  # noqa: E402
from fleece.repository.credentials import PASSWORD_VARIABLES, Credential, key_file  # noqa: E402

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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run *cmd* under /usr/bin/time; returns the process and {wall_s, cpu_s, rss_mib}."""
    fmt = "FLEECEBENCH %e %U %S %M"
    subprocess.run(["sync"], check=True)  # start every case without another case's dirty pages to write back
    p = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], capture_output=True, text=True, env=env)
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


def fleece_json(args: list[str], env: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Run ``fleece ARGS --json`` under /usr/bin/time (with :func:`fleece_env` over *env*): its JSON
    document and the timings."""
    p, t = timed([FLEECE, *args, "--json"], env=fleece_env(env))
    return json.loads(p.stdout), t


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
        """One timed ``fleece backup`` to *target*; fails unless the point (and its disk) is a *kind* —
        a full where an incremental was meant would measure the wrong thing silently."""
        def stored() -> int:
            return rgw.bucket_bytes(target[5:].split("/")[0]) if target.startswith("s3://") else du(Path(target))

        before = stored()
        if rgw is not None:
            rgw.requests()
        doc, t = fleece_json(["backup", "--qmp", vm.qmp, "--repo", target, "--scratch", str(work)], env)
        after = stored()
        st = doc["disks"]["vda"]
        if doc["kind"] != kind or st["kind"] != kind:
            raise RuntimeError(f"{case}: expected a {kind} backup of {target}, got point {doc['kind']} / "
                               f"disk vda {st['kind']}")
        r = Result(case, rep, **t, bytes_in=st["read_bytes"], bytes_stored=after - before,
                   bytes_sent=doc["uploaded_bytes"],
                   extra={"pause_ms": doc["pause_ms"], "dirty_bytes": st["dirty_bytes"], "zero_bytes": st["zero_bytes"],
                          "id": doc["id"]})
        if "audit" in st:  # the bitmap audit's own cost, inside the incremental's time
            r.extra.update(audit_s=st["audit"]["seconds"], audit_bytes=st["audit"]["bytes_read"])
        if target.startswith("s3://") and rgw is not None:
            r.requests = sum(rgw.requests().values())
            r.extra["puts"] = doc["backend_requests"].get("PUT", 0)
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
        if rgw is not None:
            fleece_backup("fleece-full-s3", s3repo, KIND_FULL, rgw.env)
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
            if i == 0:
                if rgw is not None:
                    fleece_backup("fleece-inc-s3", s3repo, KIND_INCREMENTAL, rgw.env)
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
    for case, source, dst, flags, layers in restores:
        doc, t = fleece_json(["restore", "--repo", str(source), "--vm", "benchvm", "--out", str(dst), *flags])
        out.append(Result(case, rep, **t, bytes_in=doc["disks"]["vda"]["data_bytes"],
                          extra={"layers": layers, "twin_order": order}))
    if rgw is not None:
        dst = work / "restore-s3"
        rgw.requests()
        doc, t = fleece_json(["restore", "--repo", s3repo, "--vm", "benchvm", "--out", str(dst), "--flat"], rgw.env)
        out.append(Result("fleece-restore-flat-s3", rep, **t, bytes_in=doc["disks"]["vda"]["data_bytes"],
                          requests=sum(rgw.requests().values()), extra={"layers": 2}))
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
    return out


def median(results: list[Result], case: str, attr: str) -> float | None:
    values = [getattr(r, attr) for r in results if r.case == case and getattr(r, attr) is not None]
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
        checks.append(("full: to RGW / to local (wall)", m("fleece-full-s3") / m("fleece-full"), "(info)"))
        checks.append(("incremental: to RGW / to local (wall)", m("fleece-inc-s3") / m("fleece-inc"), "(info)"))
        puts = statistics.median(r.extra["puts"] for r in results if r.case == "fleece-full-s3")
        gib = m("fleece-full-s3", "bytes_sent") / (1 << 30)
        checks.append(("full to RGW: PUT requests per GiB uploaded", puts / gib, "≤ 64"))
    if m("fleece-restore-flat-s3"):
        checks.append(("restore from RGW (flat), MB/s of disk data",
                       m("fleece-restore-flat-s3", "bytes_in") / 1e6 / m("fleece-restore-flat-s3"), "(info)"))
    rss = max(r.rss_mib for r in results if r.case.startswith("fleece") and r.rss_mib)
    checks.append(("peak RSS of any fleece run (MiB)", rss, "≤ 256 (aim 128)"))
    peer_rss = [r.rss_mib for r in results if r.case.startswith(("restic", "borg")) and r.rss_mib]
    if peer_rss:
        checks.append(("peak RSS of restic/borg (MiB)", max(peer_rss), "(info)"))
    lines.append("| ratio | value | target |")
    lines.append("|---|---:|---|")
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in checks]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, 1 repetition, 2 incrementals (~2 minutes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"), help="directory for the JSON-lines results")
    ap.add_argument("--no-s3", action="store_true", help="skip the Ceph RGW cases")
    ap.add_argument("--no-peers", action="store_true", help="skip restic and borg")
    args = ap.parse_args()
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
