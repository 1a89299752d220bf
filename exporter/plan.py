"""The extent plan: which bytes of a frozen disk to read, from NBD block status alone.

* Incremental: the frozen bitmap (``qemu:dirty-bitmap:<name>``, flag 1 = dirty) over the whole disk, then
  ``base:allocation`` *only inside the dirty ranges* (asking it over a whole big, fragmented qcow2 costs
  seconds — FIELD-NOTES §14). Dirty ranges that read as zero become ``ZERO`` entries and transfer nothing;
  the rest is cut at the chunk grid, one job (= one blob) per maximal dirty run inside a grid cell.
* Full: ``base:allocation`` alone; every grid cell holding data becomes one job covering the whole cell
  (its holes read as zeros without touching NBD), so identical cells dedup across fulls and VMs.

Everything works on sorted interval lists: cost grows with the number of extents, never with disk size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import nbd

from repository import extents as ex

MAX_STATUS = 0xFFFF0000  # block_status count must stay below 4 GiB (libnbd ERANGE)
DIRTY = 1  # qemu:dirty-bitmap flag (libnbd 1.14 has no constant for it)
ALLOC_GAP = 1 << 20  # dirty ranges this close share one base:allocation query
READ_GAP = 64 << 10  # inside a full's cell, read across holes this small instead of splitting requests


@dataclass
class Job:
    """One blob to produce: ``length`` bytes at ``offset``; only ``reads`` are fetched, the rest is zero."""

    offset: int
    length: int
    reads: ex.RangeList


@dataclass
class DiskPlan:
    size: int
    kind: str
    jobs: list[Job]
    zero: ex.RangeList = field(default_factory=list)  # ZERO entries (incremental only)
    dirty_bytes: int = 0  # bytes the plan covers: dirty (incremental) or allocated (full)
    read_bytes: int = 0


def block_status(h: nbd.NBD, context: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, flags)`` for *context* over ``[start, end)``, merged, in order."""
    pos = start
    pending: tuple[int, int, int] | None = None
    while pos < end:
        got: list[tuple[int, int, int]] = []

        def cb(metacontext: str, offset: int, entries: list[int], err: object) -> int:
            if metacontext == context:
                o = offset
                for i in range(0, len(entries), 2):
                    got.append((o, entries[i], entries[i + 1]))
                    o += entries[i]
            return 0

        h.block_status(min(MAX_STATUS, end - pos), pos, cb)
        if not got:
            raise RuntimeError(f"server returned no {context} status at offset {pos}")
        for off, length, flags in got:
            length = min(length, end - off)
            if length <= 0:
                continue
            if pending and pending[2] == flags and pending[0] + pending[1] == off:
                pending = (pending[0], pending[1] + length, flags)
            else:
                if pending:
                    yield pending
                pending = (off, length, flags)
        pos = got[-1][0] + got[-1][1]
    if pending:
        yield pending


def _data_ranges(h: nbd.NBD, start: int, end: int) -> ex.RangeList:
    """Ranges ``base:allocation`` does not report as reading zero (holes without the zero flag included)."""
    return [(o, n) for o, n, f in block_status(h, "base:allocation", start, end) if not f & nbd.STATE_ZERO]


def plan_full(h_alloc: nbd.NBD, size: int, chunk: int) -> DiskPlan:
    data = ex.normalize(_data_ranges(h_alloc, 0, size))
    jobs: list[Job] = []
    cells: dict[int, ex.RangeList] = {}
    for off, length in ex.split_at_grid(data, chunk):
        cells.setdefault(off // chunk * chunk, []).append((off, length))
    for cell, reads in cells.items():
        jobs.append(Job(cell, min(chunk, size - cell), ex.coalesce(reads, READ_GAP)))
    plan = DiskPlan(size=size, kind="full", jobs=jobs, dirty_bytes=ex.total(data))
    plan.read_bytes = sum(ex.total(j.reads) for j in jobs)
    return plan


def plan_incremental(h_dirty: nbd.NBD, h_alloc: nbd.NBD, bitmap: str, size: int, chunk: int) -> DiskPlan:
    dirty = ex.normalize((o, n) for o, n, f in block_status(h_dirty, f"qemu:dirty-bitmap:{bitmap}", 0, size)
                         if f & DIRTY)
    data: ex.RangeList = []
    for off, length in ex.coalesce(dirty, ALLOC_GAP):
        data.extend(_data_ranges(h_alloc, off, off + length))
    data = ex.intersection(dirty, ex.normalize(data))
    zero = ex.difference(dirty, data)
    jobs = [Job(off, length, [(off, length)]) for off, length in ex.split_at_grid(data, chunk)]
    return DiskPlan(size=size, kind="incremental", jobs=jobs, zero=zero, dirty_bytes=ex.total(dirty),
                    read_bytes=ex.total(data))
