"""fleece benchmark: backup and restore side by side with the baselines of the same run.

Cases (each repetition interleaves all of them on a fresh copy of the cached disk; medians are reported):

* ``nbdcopy``        — nbdcopy of the whole live disk to ``null:`` (what reading the disk costs)
* ``zstd-limit``     — the full's data cells compressed by one zstd compressor per core (the CPU limit)
* ``fleece-full``    — ``fleece backup`` (full) to a local repository
* ``fleece-inc``     — ``fleece backup`` after the ~3 % change
* ``plain-read``     — libnbd reading exactly the incremental's data extents (no hashing, no compression)
* ``fleece-restore-chain`` / ``fleece-restore-flat`` — restore of the last point of a 1 full + 5
  incrementals chain
* ``qemu-img-convert`` — ``qemu-img convert -O qcow2`` of that chain from local qcow2 files

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
from repository import RepoConfig, Repository  # noqa: E402

FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20
CHUNK = 4 * MiB


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

    t0, c0 = time.perf_counter(), time.process_time()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return Result("zstd-limit", 0, time.perf_counter() - t0, time.process_time() - c0, None, sum(nonzero),
                  sum(stored), None, extra={"threads": threads, "level": level})


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


def fleece_json(args: list[str]) -> tuple[dict, dict]:
    p, t = timed([FLEECE, *args, "--json"])
    return json.loads(p.stdout), t


def one_rep(rep: int, qcow2: Path, raw: Path, work: Path, quick: bool, incs: int) -> list[Result]:
    out: list[Result] = []
    disk = work / "disk.qcow2"
    shutil.copyfile(qcow2, disk)
    twin = work / "disk.raw"
    shutil.copyfile(raw, twin)  # sparse-unaware copy is fine: page cache warm-up for the zstd limit
    size = os.path.getsize(raw)
    vm = BenchVM(work, {"vda": disk})
    try:
        with vm.live_export("vda") as uri:
            p, t = timed(["nbdcopy", uri, "null:"])
            out.append(Result("nbdcopy", rep, **t, bytes_in=size))
        level = RepoConfig().compression["level"]
        r = zstd_limit(twin, cells_with_data(twin, size), level)
        r.rep = rep
        out.append(r)

        repo = work / "repo"
        doc, t = fleece_json(["backup", "--qmp", vm.qmp, "--repo", str(repo), "--scratch", str(work)])
        out.append(Result("fleece-full", rep, **t, bytes_in=doc["disks"]["vda"]["read_bytes"],
                          bytes_stored=du(repo), bytes_sent=doc["uploaded_bytes"],
                          extra={"pause_ms": doc["pause_ms"]}))
        points = [doc["id"]]
        for i in range(incs):
            ops = change(qcow2, seed=1000 * rep + i)  # layout of the pristine image (not in use)
            vm.apply("vda", ops)
            apply_raw(twin, ops)
            before = du(repo)
            doc, t = fleece_json(["backup", "--qmp", vm.qmp, "--repo", str(repo), "--scratch", str(work)])
            points.append(doc["id"])
            if i == 0:
                st = doc["disks"]["vda"]
                out.append(Result("fleece-inc", rep, **t, bytes_in=st["read_bytes"], bytes_stored=du(repo) - before,
                                  bytes_sent=doc["uploaded_bytes"],
                                  extra={"dirty_bytes": st["dirty_bytes"], "zero_bytes": st["zero_bytes"]}))
                m = Repository.open(str(repo)).manifest("benchvm", doc["id"])
                extents = [(o, n) for o, n, b in m.disks["vda"].extents if b is not None]
                with vm.live_export("vda") as uri:
                    r = plain_read(uri, extents)
                r.rep = rep
                c = zstandard.ZstdCompressor(level=level)
                fd = os.open(twin, os.O_RDONLY)
                r.extra["dirty_zstd_bytes"] = sum(len(c.compress(os.pread(fd, n, o))) for o, n in extents)
                os.close(fd)
                out.append(r)
    finally:
        vm.quit()

    for mode in ("chain", "flat"):
        dst = work / f"restore-{mode}"
        extra = ["--flat"] if mode == "flat" else []
        doc, t = fleece_json(["restore", "--repo", str(repo), "--vm", "benchvm", "--out", str(dst), *extra])
        out.append(Result(f"fleece-restore-{mode}", rep, **t, bytes_in=doc["disks"]["vda"]["data_bytes"],
                          extra={"layers": len(points)}))
    chain_top = work / "restore-chain" / "vda.qcow2"
    if rep == 0:  # correctness of the benchmark itself: both restores equal the VM's disk
        for img in (chain_top, work / "restore-flat" / "vda.qcow2"):
            cmp = subprocess.run(["qemu-img", "compare", "-F", "raw", str(img), str(twin)], capture_output=True,
                                 text=True)
            if cmp.returncode != 0:
                raise RuntimeError(f"benchmark restore {img} differs from the source: {cmp.stdout}")
    converted = work / "converted.qcow2"
    p, t = timed(["qemu-img", "convert", "-O", "qcow2", str(chain_top), str(converted)])
    out.append(Result("qemu-img-convert", rep, **t, extra={"layers": len(points)}))
    return out


def median(results: list[Result], case: str, attr: str) -> float | None:
    values = [getattr(r, attr) for r in results if r.case == case and getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def report(results: list[Result], reps: int) -> str:
    cases = list(dict.fromkeys(r.case for r in results))
    lines = [f"| case (median of {reps}) | wall s | CPU s | peak RSS MiB | data MB | stored MB | sent MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def f(v: float | None, scale: float = 1, digits: int = 2) -> str:
        return "–" if v is None else f"{v / scale:.{digits}f}"

    for c in cases:
        lines.append(f"| {c} | {f(median(results, c, 'wall_s'))} | {f(median(results, c, 'cpu_s'))} | "
                     f"{f(median(results, c, 'rss_mib'), digits=0)} | {f(median(results, c, 'bytes_in'), 1e6, 0)} | "
                     f"{f(median(results, c, 'bytes_stored'), 1e6, 1)} | {f(median(results, c, 'bytes_sent'), 1e6, 1)} |")
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
    if m("fleece-restore-flat") and m("qemu-img-convert"):
        checks.append(("flat restore / qemu-img convert of the chain", m("fleece-restore-flat") / m("qemu-img-convert"),
                       "≤ 1.00"))
        checks.append(("chain restore / qemu-img convert of the chain",
                       m("fleece-restore-chain") / m("qemu-img-convert"), "(info)"))
    rss = max(r.rss_mib for r in results if r.case.startswith("fleece") and r.rss_mib)
    checks.append(("peak RSS of any fleece run (MiB)", rss, "≤ 256"))
    lines.append("| ratio | value | target |")
    lines.append("|---|---:|---|")
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in checks]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, 1 repetition, 2 incrementals (~2 minutes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"), help="directory for the JSON-lines results")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    incs = 2 if args.quick else 5
    print(f"building / reusing the benchmark disk in {CACHE} ...", file=sys.stderr, flush=True)
    qcow2, raw = build_disk(quick=args.quick)
    results: list[Result] = []
    for rep in range(reps):
        work = Path(tempfile.mkdtemp(prefix="fleece-bench-", dir=CACHE))
        try:
            print(f"repetition {rep + 1}/{reps} ...", file=sys.stderr, flush=True)
            results += one_rep(rep, qcow2, raw, work, args.quick, incs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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
