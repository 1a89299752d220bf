"""Benchmark of the repository writer against the machine's zstd limit on the same data.

Prints: the zstd baseline (one compressor per core, same level, same 4 MiB chunks, no hashing, no
packing, no I/O), the writer (sha256 + dedup + zstd + packs + fsync'ed local repository), their ratio
and the writer's peak RSS. Each side runs in its own process so RSS and page cache effects stay apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 4 << 20


def run_zstd(path: str, level: int, threads: int) -> dict:
    import zstandard

    size = os.path.getsize(path)
    offsets = list(range(0, size, CHUNK))
    lock = threading.Lock()
    out = {"stored": 0}

    def worker(mine: list[int]) -> None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        fd = os.open(path, os.O_RDONLY)
        stored = 0
        for off in mine:
            stored += len(c.compress(os.pread(fd, CHUNK, off)))
        os.close(fd)
        with lock:
            out["stored"] += stored

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(offsets[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"seconds": time.perf_counter() - t0, "stored": out["stored"], "bytes": size}


def run_writer(path: str, repo_dir: str) -> dict:
    from fleece.repository import Repository

    size = os.path.getsize(path)
    repo = Repository.open(repo_dir, create=True)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    with repo.writer() as w:
        for off in range(0, size, CHUNK):
            w.add(os.pread(fd, CHUNK, off))
        stats = w.flush()
    os.close(fd)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "stored": stats.stored_bytes, "uploaded": stats.uploaded_bytes, "bytes": size,
            "packs": stats.packs, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="2G", help="bytes of /usr data to push through (default 2G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        res = run_zstd(rest[0], int(rest[1]), int(rest[2])) if kind == "zstd" else run_writer(*rest)
        print(json.dumps(res))
        return

    from benchlib.corpus import CACHE, corpus
    from fleece.repository import RepoConfig
    from fleece.repository.ratelimit import parse_rate

    size = parse_rate(a.size)
    data = str(corpus(size))
    level = RepoConfig().compression["level"]
    cores = os.cpu_count() or 1
    subprocess.run(["cat", data], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    base, wr = [], []
    for _ in range(a.runs):  # interleaved: this machine is noisy
        base.append(child(["zstd", data, str(level), str(cores)]))
        repo_dir = tempfile.mkdtemp(prefix="bench-repo-", dir=CACHE)
        try:
            wr.append(child(["writer", data, repo_dir]))
        finally:
            shutil.rmtree(repo_dir)
    b = statistics.median(r["seconds"] for r in base)
    w = statistics.median(r["seconds"] for r in wr)
    mb = size / 1e6
    print(f"data: {size / 2**30:.2f} GiB of /usr files, zstd level {level}, {cores} cores, median of {a.runs}")
    print(f"zstd limit ({cores} threads, one compressor each): {b:6.2f} s  {mb / b:7.1f} MB/s  "
          f"ratio {size / base[0]['stored']:.2f}")
    print(f"fleece writer (hash+zstd+pack+fsync):    {w:6.2f} s  {mb / w:7.1f} MB/s  "
          f"stored {wr[0]['stored'] / 1e6:.0f} MB in {wr[0]['packs']} packs")
    print(f"writer throughput / zstd limit: {b / w:.2f}  (target >= 0.80)")
    print(f"writer peak RSS: {max(r['rss_mib'] for r in wr):.0f} MiB  (target < 256)")


if __name__ == "__main__":
    main()
