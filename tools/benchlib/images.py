"""The images of the benchmark's scale cases, built once and cached next to the main disk.

* the 64 GiB disk (``--big``): where memory must not grow with the disk. Mostly holes, ~4 GiB of real
  data in two far-apart regions — the main benchmark disk at offset 0 and a different 2 GiB of /usr
  data at 40 GiB — so that a backup or restore holding per-byte or per-cell state of the whole disk
  shows up in its peak RSS, and so that the data is real (compressible like a VM's) rather than zeros.
* the 1 TiB sparse disk (``--sparse``): 2,000 scattered 64 KiB clusters, where a full must cost what
  the data costs (O(extents)), not what the virtual size does.

Only the finished qcow2 files stay in the cache; the raw staging file (64 GiB virtual) is removed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .corpus import CACHE, corpus
from .disk import build_disk

GiB = 1 << 30
TiB = 1 << 40
BIG_SIZE = 64 * GiB
BIG_SECOND_AT = 40 * GiB  # where the second data region starts (far from the first: two separate runs)
BIG_SECOND = 2 * GiB
SPARSE_SIZE = TiB
SPARSE_CLUSTERS = 2000
SPARSE_CLUSTER = 64 << 10  # bench_plan.GRANULE: one qcow2 cluster (the default cluster size)
SPARSE_SEED = 1


def _dd_into(src: Path, dst: Path, offset: int) -> None:
    """Copy *src* into *dst* at *offset*, keeping holes (zero blocks are skipped, never allocated)."""
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=sparse,notrunc", "oflag=seek_bytes",
                    f"seek={offset}", "status=none"], check=True)


def build_big_disk() -> Path:
    """The cached 64 GiB qcow2 (see module docstring), built on first use (a few minutes)."""
    qcow2 = CACHE / "disk-64g.qcow2"
    if qcow2.exists():
        return qcow2
    _, raw = build_disk(quick=False)
    second_cached = (CACHE / f"corpus-{BIG_SECOND}.bin").exists()
    second = corpus(BIG_SECOND)
    staging = CACHE / "disk-64g.raw.tmp"
    partial = CACHE / "disk-64g.qcow2.tmp"
    try:
        with open(staging, "wb") as f:
            f.truncate(BIG_SIZE)
        _dd_into(raw, staging, 0)
        _dd_into(second, staging, BIG_SECOND_AT)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(staging), str(partial)], check=True)
        os.replace(partial, qcow2)
    finally:
        staging.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        if not second_cached:  # an ingredient only: the qcow2 is what is reused
            second.unlink(missing_ok=True)
    return qcow2


def build_sparse_disk() -> Path:
    """The cached 1 TiB qcow2 with :data:`SPARSE_CLUSTERS` scattered 64 KiB clusters (fixed seed), made by
    ``tools/bench_plan.build_image`` (seconds)."""
    from bench_plan import GRANULE, build_image  # tools/ is on sys.path when bench.py runs

    assert GRANULE == SPARSE_CLUSTER
    qcow2 = CACHE / f"sparse-1t-{SPARSE_CLUSTERS}.qcow2"
    if qcow2.exists():
        return qcow2
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = qcow2.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    try:
        build_image(partial, SPARSE_SIZE, SPARSE_CLUSTERS, seed=SPARSE_SEED)
        os.replace(partial, qcow2)
    finally:
        partial.unlink(missing_ok=True)
    return qcow2


def allocated_bytes(image: Path) -> int:
    """Bytes of *image* (any format qemu-img reads, and its backing chain) that hold data."""
    out = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)], capture_output=True,
                                    text=True, check=True).stdout)
    return sum(e["length"] for e in out if e["data"])


def same_disk(image: Path, reference: Path, reference_format: str = "qcow2") -> None:
    """Raise unless *image* (a qcow2, possibly the top of a chain) reads exactly like *reference*."""
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", reference_format, str(image), str(reference)],
                         capture_output=True, text=True)
    if cmp.returncode != 0:
        raise RuntimeError(f"{image} differs from {reference}: {cmp.stdout.strip()} {cmp.stderr.strip()}")
