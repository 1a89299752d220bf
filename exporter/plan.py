"""The extent plan: which bytes of a frozen disk to read, from NBD block status — without trusting it blindly.

Three read-only NBD exports per disk feed the plan (DESIGN §6, FIELD-NOTES §5e, §14):

* the **frozen view** (snapshot-access): its ``qemu:dirty-bitmap:<old>`` is the frozen bitmap (flag 1 =
  dirty), disabled at the point in time and so immutable. Its ``base:allocation`` is *not* used: on QEMU
  7.2 it reports ranges the guest zeroed or discarded after the freeze as zero although reads of the view
  return the old bytes, and it calls every range of a qcow2 overlay that the overlay itself does not
  allocate "hole but not zero", so a full of a thin overlay would read the whole virtual disk.
* the **live disk node**: its ``base:allocation`` covers the whole backing chain (QEMU's NBD server asks
  ``block_status_above``), so a range read from a backing file is data and a range nothing in the chain
  allocates is zero. It describes the disk *now*, not at the freeze.
* the **fleece target** (the copy-before-write scratch image): ranges it holds as data are exactly the
  clusters the guest has overwritten, zeroed or discarded since the freeze, copied there first.

The plan is ``data = (live status says non-zero) ∪ (target holds data)``, with the target queried only
after every live-status query has returned. Why this cannot drop a byte that held data at the freeze T:
the live status of a byte can differ from its status at T only if a write, write-zeroes or discard
reached the disk node after T. Every such request passes through the copy-before-write filter (the
device is attached to it), which copies the old cluster into the target and only then forwards the
request. So a byte whose live status was read as zero while it held data at T had its cluster copied
before that status query finished — before the target query started — and the target (which only grows
during a run: nothing discards on it) reports it as data. The opposite error, live status calling data
what was zero at T, only costs a read: all-zero blobs are recorded as zero. If the copy itself fails,
``on-cbw-error: break-snapshot`` makes every read of the frozen view fail: the backup fails, nothing is
recorded. (Writes that bypass the filter — another tool writing to the node itself — would break the
frozen view as much as the plan; no fleece can guard against those.)

* Incremental: the frozen bitmap over the whole disk, then the live status *only inside the dirty ranges*
  (asking it over a whole big, fragmented qcow2 costs seconds — FIELD-NOTES §14), pipelined with AIO, and
  only for groups of dirty ranges big enough to be worth a query (``STATUS_MIN``): 10,000 scattered small
  extents are simply read. Dirty ranges that read as zero become ``ZERO`` entries and transfer nothing;
  the rest is cut at the chunk grid, one job (= one blob) per maximal dirty run inside a grid cell.
* Full: live status alone; every grid cell mostly holding data becomes one job covering the whole cell
  (its holes read as zeros without touching NBD), so identical cells dedup across fulls and VMs. A cell
  holding little data (less than half of it, its runs joined across gaps under ``SPARSE_GAP``) becomes one
  job per run instead: hashing and compressing a whole 4 MiB cell for one 64 KiB cluster made a full of a
  1 TiB disk with 2,000 scattered clusters process 7.8 GB for 125 MiB of data (6.4 s); per run it costs
  what the data costs. The same allocation gives the same runs, so such cells still dedup between fulls.

Everything works on sorted interval lists: cost grows with the number of extents, never with disk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import nbd

from fleece.repository import extents as ex

from fleece.repository.errors import ExportReadError

MAX_STATUS = 0xFFFF0000  # block_status count must stay below 4 GiB (libnbd ERANGE)
DIRTY = 1  # qemu:dirty-bitmap flag (libnbd 1.14 has no constant for it)
ALLOC_GAP = 1 << 20  # dirty ranges this close share one base:allocation query
READ_GAP = 64 << 10  # inside a full's cell, read across holes this small instead of splitting requests
SPARSE_GAP = 1 << 20  # inside a sparse cell of a full, one blob spans holes this small (few tiny blobs)
STATUS_IN_FLIGHT = 64  # pipelined block-status requests per connection
# A block-status query costs QEMU about as much as reading a few hundred KiB (85-300 µs each on a
# fragmented 1 TiB qcow2, measured by tools/bench_plan.py): a group of dirty ranges holding less than
# this is read without asking, and the content decides (an all-zero blob is recorded as ZERO anyway).
STATUS_MIN = 1 << 20

ALLOCATION = "base:allocation"


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
    dirty: ex.RangeList = field(default_factory=list)  # the frozen bitmap's dirty ranges (incremental only)
    dirty_bytes: int = 0  # bytes the plan covers: dirty (incremental) or allocated (full)
    read_bytes: int = 0
    # Bytes the live status called zero but the fleece target holds: overwritten after the freeze and
    # read from the frozen view only because the plan checks the target (FIELD-NOTES §5e).
    rescued_bytes: int = 0


@dataclass
class PlanSources:
    """The NBD handles a plan reads from (see the module docstring for why three).

    *target* None: *allocation* is a frozen view whose own ``base:allocation`` is right at the freeze —
    libvirt's pull-mode export (exporter/virt.py): a scratch qcow2 *backed by* the live disk, filled by
    ``blockdev-backup sync=none`` before any guest write lands. A cluster the guest changes after the
    freeze is copied into the scratch image first, so the export reports it as data (the old bytes)
    from that moment on; one it never changes reads through to the disk, whose status for it has not
    changed either. Neither state can be seen as zero while it held data at the freeze (measured for
    write-zeroes, zero-filled writes on ``detect_zeroes`` disks and discards: docs/libvirt-pull-mode.md §3).
    """

    allocation: nbd.NBD  # live disk node, ``base:allocation`` (whole chain) — or libvirt's frozen view
    target: nbd.NBD | None  # fleece target, ``base:allocation``; None: *allocation* is frozen itself
    dirty: nbd.NBD | None = None  # frozen view, ``qemu:dirty-bitmap:<old>`` (incrementals)
    #: Called between the live-status queries and the target query (tests act in that window).
    between: Callable[[], None] | None = None


def _collect(context: str, got: list[tuple[int, int, int]]) -> Callable[[str, int, list[int], object], int]:
    """A libnbd extent callback appending ``(offset, length, flags)`` of *context* to *got*."""

    def extent(metacontext: str, offset: int, entries: list[int], err: object) -> int:
        if metacontext == context:
            for i in range(0, len(entries), 2):
                got.append((offset, entries[i], entries[i + 1]))
                offset += entries[i]
        return 0

    return extent


def block_status(h: nbd.NBD, context: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, flags)`` for *context* over ``[start, end)``, merged, in order."""
    pos = start
    pending: tuple[int, int, int] | None = None
    while pos < end:
        got: list[tuple[int, int, int]] = []
        h.block_status(min(MAX_STATUS, end - pos), pos, _collect(context, got))
        if not got:
            raise ExportReadError(f"the NBD server returned no {context} status at offset {pos}; "
                                  "the export cannot be planned (is the fleece still in place?)")
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


def status_of_ranges(h: nbd.NBD, context: str, ranges: Iterable[ex.Range],
                     depth: int = STATUS_IN_FLIGHT) -> list[tuple[int, int, int]]:
    """``(offset, length, flags)`` of *context* covering each of *ranges*, sorted; pipelined.

    Each range is asked for with AIO requests, up to *depth* in flight; a reply that covers less than
    asked for (servers may stop early) is followed by a request for the rest. Entries are clipped to the
    ranges asked for, so the result never describes bytes outside them.
    """
    todo = [(o, o + n) for o, n in ranges if n > 0]
    todo.reverse()  # pop() from the front of the sorted input
    out: list[tuple[int, int, int]] = []
    inflight = 0
    done: list[tuple[int, int, list[tuple[int, int, int]], int]] = []

    def submit(start: int, end: int) -> None:
        nonlocal inflight
        got: list[tuple[int, int, int]] = []

        def completed(err: object) -> int:
            nonlocal inflight
            inflight -= 1
            done.append((start, end, got, getattr(err, "value", 0)))
            return 1  # auto-retire

        h.aio_block_status(min(MAX_STATUS, end - start), start, _collect(context, got), completion=completed)
        inflight += 1

    while todo or inflight or done:
        while todo and inflight < depth:
            start, end = todo.pop()
            submit(start, end)
        while not done:
            h.poll(-1)
        for start, end, got, err in done:
            if err:
                raise ExportReadError(f"{context} status at offset {start} failed: errno {err}")
            covered = start
            for off, length, flags in got:
                lo, hi = max(off, start), min(off + length, end)
                if lo < hi:
                    out.append((lo, hi - lo, flags))
                    covered = max(covered, hi)
            if not got or covered <= start:
                raise ExportReadError(f"the NBD server returned no {context} status at offset {start}")
            if covered < end:
                todo.append((covered, end))
        done.clear()
    out.sort()
    return out


def _nonzero(entries: Iterable[tuple[int, int, int]]) -> ex.RangeList:
    """Ranges ``base:allocation`` does not report as reading zero (holes without the zero flag included)."""
    return ex.normalize((o, n) for o, n, f in entries if not f & nbd.STATE_ZERO)


def overwritten(h_target: nbd.NBD, size: int) -> ex.RangeList:
    """What the fleece target holds as data: clusters changed on the disk since the freeze."""
    return _nonzero(block_status(h_target, ALLOCATION, 0, size))


def _check(src: PlanSources, status: ex.RangeList, size: int) -> tuple[ex.RangeList, ex.RangeList]:
    """``(status ∪ target data, target data)`` — the target queried strictly after *status* was read."""
    if src.between is not None:
        src.between()
    if src.target is None:  # the allocation source is the frozen view itself: nothing can have moved
        return status, []
    target = overwritten(src.target, size)
    return ex.union(status, target), target


def plan_full(src: PlanSources, size: int, chunk: int) -> DiskPlan:
    status = _nonzero(block_status(src.allocation, ALLOCATION, 0, size))
    data, target = _check(src, status, size)
    data = ex.clip(data, size)
    jobs: list[Job] = []
    cells: dict[int, ex.RangeList] = {}
    for off, length in ex.split_at_grid(data, chunk):
        cells.setdefault(off // chunk * chunk, []).append((off, length))
    for cell, reads in cells.items():
        length = min(chunk, size - cell)
        runs, fetch = ex.coalesce(reads, SPARSE_GAP), ex.coalesce(reads, READ_GAP)
        if 2 * ex.total(runs) >= length:  # mostly data: the whole cell, one blob (dedups as a cell)
            jobs.append(Job(cell, length, fetch))
        else:  # little data: a blob per run, costing what the data costs
            jobs.extend(Job(o, n, ex.intersection(fetch, [(o, n)])) for o, n in runs)
    plan = DiskPlan(size=size, kind="full", jobs=jobs, dirty_bytes=ex.total(data),
                    rescued_bytes=ex.total(ex.difference(target, status)))
    plan.read_bytes = sum(ex.total(j.reads) for j in jobs)
    return plan


def dirty_ranges(h_dirty: nbd.NBD, bitmap: str, size: int) -> ex.RangeList:
    return ex.normalize((o, n) for o, n, f in block_status(h_dirty, f"qemu:dirty-bitmap:{bitmap}", 0, size)
                        if f & DIRTY)


def _worth_asking(dirty: ex.RangeList) -> tuple[ex.RangeList, ex.RangeList]:
    """Split the dirty ranges into groups (``ALLOC_GAP`` apart) worth a status query and the rest. O(n)."""
    asked: ex.RangeList = []
    unasked: ex.RangeList = []
    i = 0
    while i < len(dirty):
        start, end, held = dirty[i][0], dirty[i][0] + dirty[i][1], dirty[i][1]
        i += 1
        while i < len(dirty) and dirty[i][0] - end <= ALLOC_GAP:
            end, held = dirty[i][0] + dirty[i][1], held + dirty[i][1]
            i += 1
        (asked if held >= STATUS_MIN else unasked).append((start, end - start))
    return asked, unasked


def plan_incremental(src: PlanSources, bitmap: str, size: int, chunk: int) -> DiskPlan:
    assert src.dirty is not None
    dirty = dirty_ranges(src.dirty, bitmap, size)
    asked, unasked = _worth_asking(dirty)
    status = ex.intersection(dirty, ex.union(_nonzero(status_of_ranges(src.allocation, ALLOCATION, asked)),
                                             unasked))
    data, target = _check(src, status, size)
    data = ex.intersection(dirty, data)
    zero = ex.difference(dirty, data)
    jobs = [Job(off, length, [(off, length)]) for off, length in ex.split_at_grid(data, chunk)]
    return DiskPlan(size=size, kind="incremental", jobs=jobs, zero=zero, dirty=dirty, dirty_bytes=ex.total(dirty),
                    read_bytes=ex.total(data), rescued_bytes=ex.total(ex.difference(data, status)))
