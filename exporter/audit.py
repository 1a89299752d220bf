"""Trust, but verify, the dirty bitmap: re-read a small random sample of *clean* ranges every incremental.

An incremental trusts the bitmap to name every byte written since its parent point. A bitmap that missed
writes — the image written outside QEMU (``qemu-io``, a repair tool, a host-side restore) while its
bitmap was not recording, a bug — turns every later point into a silent lie, and no other check would
notice: verify and restore only prove the repository is self-consistent.

So each incremental samples ranges the bitmap calls clean and compares them with what the parent point
says they hold:

* whole blobs of the parent's resolved map (half from its newest layers, where a recent miss shows,
  half uniformly over the disk): read from the frozen view, their blob id must match;
* ranges the parent holds as zero (unlisted or ``ZERO``): they must read as zero;
* always, the parent's last few clean data pieces, compared byte for byte with the blobs' contents from
  the repository (pieces need not be whole blobs; the dirty parts of a piece are left out, its clean
  parts are checked). This one is aimed: a disk shrunk and grown back to its old size between two
  backups reads zero in the regrown tail while QEMU's bitmap — truncated, then regrown clean — calls it
  unchanged. The only data above the shrink point is in the pieces above it, and the last ones are
  those. It runs first and is never cut short by the time budget.

Both are exact facts, not heuristics: a clean range is unchanged since the parent point by definition.
A mismatch means the bitmap cannot be trusted: the caller makes that disk a *verified full* (read
everything; dedup keeps the upload to the blobs the repository lacks) and records why in the manifest.
The cost is bounded by the sample size (default 16 blobs, ≤ 64 MiB) and a time budget.

A host holding a write-only key (format 2) cannot read blob contents back: its audit compares whole
blobs by id and zero ranges, and skips the partial pieces (``parts_skipped``) — the one check it loses
is the shrink-and-regrow case, which a full key's next incremental still catches.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import nbd

from fleece.repository import extents as ex
from fleece.repository.chain import Piece, resolve
from fleece.repository.codec import BlobIdentity, blob_id
from fleece.repository.manifest import Manifest
from fleece.repository.workers import run_all

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 16
ZERO_PROBE = 1 << 20  # bytes per sampled zero range
TIME_BUDGET = 10.0  # seconds: stop sampling (and say so) rather than stall a backup on a slow disk


@dataclass
class AuditReport:
    """What one disk's sample read and found (recorded in the disk's stats as ``audit``)."""

    blobs: int = 0
    zero_ranges: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    mismatches: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, what)
    truncated: bool = False  # the time budget ran out before the whole sample was read
    parts_skipped: int = 0  # partial pieces not compared: their blobs could not be read (a write-only key)

    def to_json(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "zero_ranges": self.zero_ranges, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3), "truncated": self.truncated, "parts_skipped": self.parts_skipped,
                "mismatches": [{"offset": o, "length": n, "what": w} for o, n, w in self.mismatches[:16]],
                "mismatch_count": len(self.mismatches)}


TAIL_PIECES = 4


@dataclass
class Sample:
    blobs: list[Piece]  # whole clean blobs: compared by id
    zeros: ex.RangeList  # clean ranges the parent holds as zero
    tail: list[Piece]  # clean parts of the last data pieces: compared with the blobs' bytes
    tail_blobs: list[Piece] = field(default_factory=list)  # last data pieces that are whole clean blobs


def choose_sample(chain: list[Manifest], disk: str, dirty: ex.RangeList, size: int, count: int,
                  rng: random.Random) -> Sample:
    """What to check; *chain* is the parent's layers, newest first."""
    if count <= 0:
        return Sample([], [], [], [])
    layers = [m.disks[disk].extents for m in chain]
    age = {}  # (offset, length, blob) of every entry -> index of the layer that wrote it (0 = newest)
    for i, m in enumerate(chain):
        record = m.disks[disk]
        for e in record.extents:
            if e[0] not in record.parts:  # an entry covering part of its blob (merged) cannot be checked by id
                age.setdefault(e, i)
    pieces = resolve(layers, [m.disks[disk].skips for m in chain])
    clean = [p for p in _clean(pieces, dirty) if p.blob is not None]
    whole = [p for p in clean if p.skip == 0 and (p.offset, p.length, p.blob) in age]
    whole_set = set(whole)
    half = (count + 1) // 2
    newest = sorted(whole, key=lambda p: age[(p.offset, p.length, p.blob)])
    picked = set(rng.sample(newest[: half * 4], min(half, len(newest))))
    rest = [p for p in whole if p not in picked]
    picked.update(rng.sample(rest, min(count - len(picked), len(rest))))

    data = ex.normalize((p.offset, p.length) for p in pieces if p.blob is not None)
    zeros = _zero_probes(ex.difference(ex.complement(data, size), dirty), max(1, count // 4), rng)
    # The tail: the clean parts of the last data pieces, dirty or not (a regrown disk's stale blob may
    # also hold a guest write). Whole clean blobs are checked by id; parts need the blob's bytes.
    tail_ids: list[Piece] = []
    parts: list[Piece] = []
    for p in [p for p in pieces if p.blob is not None][-TAIL_PIECES:]:
        for off, length in ex.difference([(p.offset, p.length)], dirty):
            part = Piece(off, length, p.blob, p.skip + off - p.offset)
            (tail_ids if part in whole_set else parts).append(part)
    return Sample(sorted(picked - set(tail_ids), key=lambda p: p.offset), zeros, parts, tail_ids)


def _clean(pieces: list[Piece], dirty: ex.RangeList) -> list[Piece]:
    """The pieces (sorted, disjoint) that no dirty range touches: one sweep, O(pieces + dirty)."""
    out: list[Piece] = []
    j = 0
    for p in pieces:
        end = p.offset + p.length
        while j < len(dirty) and dirty[j][0] + dirty[j][1] <= p.offset:
            j += 1
        if j < len(dirty) and dirty[j][0] < end:
            continue
        out.append(p)
    return out


def _zero_probes(zeros: ex.RangeList, count: int, rng: random.Random) -> ex.RangeList:
    """*count* probes of up to ``ZERO_PROBE`` bytes at uniformly random places of *zeros* (O(count·log n))."""
    if not zeros:
        return []
    starts, total = [], 0
    for _, length in zeros:
        starts.append(total)
        total += length
    probes: ex.RangeList = []
    for _ in range(count):
        pos = rng.randrange(total)
        i = bisect.bisect_right(starts, pos) - 1
        off, length = zeros[i]
        at = off + (pos - starts[i])
        start = max(off, min(at - at % ZERO_PROBE, off + length - ZERO_PROBE))
        probes.append((start, min(ZERO_PROBE, off + length - start)))
    return sorted(set(probes))  # never merged: each read stays one small request


READERS = 2  # connections reading the sample: hashing 64 MiB is CPU-bound, and the pull has not started


def audit(connect: Callable[[], nbd.NBD], sample: Sample, fetch: Callable[[list[bytes]], dict[bytes, bytes]],
          budget: float = TIME_BUDGET, ident: BlobIdentity = blob_id) -> AuditReport:
    """Read the sample from the frozen view and compare (see the module docstring).

    *connect* opens a connection to the frozen view (one per reader); *fetch* returns the plaintext of
    blobs from the repository (for tail pieces that are parts of blobs only; the blobs it cannot give
    are skipped); *ident* is the repository's blob id function.
    """
    report = AuditReport()
    started = time.monotonic()
    contents = fetch(sorted({p.blob for p in sample.tail if p.blob is not None}))
    parts = [p for p in sample.tail if p.blob in contents]
    report.parts_skipped = len(sample.tail) - len(parts)
    # The tail first and never cut short by the budget: it is the aimed check, at most 4 pieces.
    checks: list[tuple[str, int, int, Piece | None]] = (
        [("part", p.offset, p.length, p) for p in parts]
        + [("tail", p.offset, p.length, p) for p in sample.tail_blobs]
        + [("blob", p.offset, p.length, p) for p in sample.blobs]
        + [("zero", off, length, None) for off, length in sample.zeros])
    lock = threading.Lock()

    def read(share: list[tuple[str, int, int, Piece | None]]) -> None:
        h = connect()
        try:
            for kind, off, length, p in share:
                if kind not in ("part", "tail") and time.monotonic() - started > budget:
                    report.truncated = True
                    return
                data = h.pread(length, off)
                if kind == "zero":
                    bad = data.count(0) != length
                    what = "zero in the parent point, data now"
                else:
                    assert p is not None and p.blob is not None
                    bad = (data != contents[p.blob][p.skip:p.skip + p.length] if kind == "part"
                           else ident(data) != p.blob)
                    what = f"{'data of ' if kind == 'part' else ''}blob {p.blob.hex()[:16]} differs"
                with lock:
                    report.bytes_read += length
                    if kind == "zero":
                        report.zero_ranges += 1
                    else:
                        report.blobs += 1
                    if bad:
                        report.mismatches.append((off, length, what))
        finally:
            h.shutdown()

    # one connection per reader, each checking every READERS-th range
    run_all([checks[i::READERS] for i in range(READERS)], lambda: read, workers=READERS, name="fleece-audit")
    report.mismatches.sort()
    report.seconds = time.monotonic() - started
    return report
