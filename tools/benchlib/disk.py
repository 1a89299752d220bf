"""The benchmark disk and its reproducible "change".

Disk: a 4 GiB qcow2 holding an ext4 filesystem filled (``mkfs.ext4 -d``) with ~2 GB of real files from
/usr — binaries, libraries, headers, docs — built once and cached. A raw twin serves the file-level tools
(restic, borg) and the zstd limit.

Change (~3 % of the disk, seeded): whole files rewritten (contiguous runs of real file data over
allocated areas), small scattered 4 KiB writes, and trimmed/zeroed ranges — applied through the running
VM (HMP qemu-io on the device) and, identically, to the raw twin.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .corpus import CACHE, usr_files

MiB = 1 << 20
GiB = 1 << 30
SIZE = 4 * GiB
SOURCES = ("/usr/share", "/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/include")


@dataclass
class Op:
    kind: str  # "write" | "zero"
    offset: int
    length: int
    data: bytes | None = None


def build_disk(quick: bool = False) -> tuple[Path, Path]:
    """Return ``(qcow2, raw)`` of the cached benchmark disk, building them on first use."""
    size = GiB if quick else SIZE
    tag = "quick" if quick else "full"
    qcow2, raw = CACHE / f"disk-{tag}.qcow2", CACHE / f"disk-{tag}.raw"
    if qcow2.exists() and raw.exists():
        return qcow2, raw
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = CACHE / f"staging-{tag}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    budget = (size // 2) - 64 * MiB
    used = 0
    for src in SOURCES if not quick else ("/usr/share", "/usr/include"):
        dst = staging / src.strip("/").replace("/", "_")
        dst.mkdir()
        for p in usr_files((src,)):
            n = os.path.getsize(p)
            if used + n > budget:
                break
            target = dst / os.path.relpath(p, src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copyfile(p, target)
            used += n
    tmp_raw = raw.with_suffix(".tmp")
    with open(tmp_raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(staging), "-E", "root_owner=0:0", str(tmp_raw)], check=True)
    shutil.rmtree(staging)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tmp_raw), str(qcow2)], check=True)
    os.replace(tmp_raw, raw)
    return qcow2, raw


def data_ranges(qcow2: Path) -> list[tuple[int, int]]:
    out = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(qcow2)], check=True,
                                    capture_output=True, text=True).stdout)
    return [(e["start"], e["length"]) for e in out if e["data"]]


def change(qcow2: Path, seed: int, fraction: float = 0.03) -> list[Op]:
    """A realistic ~*fraction* change of the disk (see module docstring); deterministic per seed."""
    rng = random.Random(seed)
    size = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)], check=True,
                                     capture_output=True, text=True).stdout)["virtual-size"]
    budget = int(size * fraction)
    data = [r for r in data_ranges(qcow2) if r[1] >= MiB]
    pool = _file_bytes(budget // 2 + MiB, rng)
    ops: list[Op] = []
    # ~40 %: whole files rewritten (1-4 MiB runs of real file data over allocated areas)
    pos = 0
    target = int(budget * 0.4)
    while pos < target:
        n = rng.choice((1, 2, 4)) * MiB
        start, length = rng.choice(data)
        off = (start + rng.randrange(0, max(1, length - n))) // 4096 * 4096
        ops.append(Op("write", off, n, pool[pos % len(pool):][:n].ljust(n, b"\0")))
        pos += n
    # ~40 %: scattered 4 KiB writes (each dirties one 64 KiB granule)
    for _ in range(int(budget * 0.4) // (64 << 10)):
        start, length = rng.choice(data)
        off = (start + rng.randrange(0, length - 4096)) // 4096 * 4096
        chunk = rng.randrange(0, len(pool) - 4096)
        ops.append(Op("write", off, 4096, pool[chunk:chunk + 4096]))
    # ~20 %: trimmed / zeroed ranges (deleted files)
    zeroed = 0
    while zeroed < budget * 0.2:
        n = rng.choice((1, 2)) * MiB
        start, length = rng.choice(data)
        off = (start + rng.randrange(0, max(1, length - n))) // 65536 * 65536
        ops.append(Op("zero", off, n))
        zeroed += n
    return ops


def _file_bytes(n: int, rng: random.Random) -> bytes:
    files = [p for p in usr_files(("/usr/share/doc", "/usr/lib/python3.11")) if os.path.getsize(p) > 4096]
    rng.shuffle(files)
    out = bytearray()
    for p in files:
        out += Path(p).read_bytes()
        if len(out) >= n:
            break
    return bytes(out[:n])


def apply_raw(raw: Path, ops: list[Op]) -> None:
    with open(raw, "r+b") as f:
        for op in ops:
            f.seek(op.offset)
            f.write(op.data if op.kind == "write" else bytes(op.length))
