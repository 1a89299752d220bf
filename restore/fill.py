"""Fill one target image from a list of pieces: ranged reads, decoding and writing in two linked stages.

* **Decoders** (``workers`` threads) take one range read at a time — several neighbouring blobs of one
  pack in one GET — open, decompress and verify each blob against its id (zstandard, hashlib and the AEAD
  release the GIL) *into a pooled, page-aligned buffer*, find its zero grains, and hand the writes to
  the writer stage. Every blob is fetched and decoded once however many pieces use it.
* **Writers** own the target's handles (an NBD connection each, or the shared descriptor of a file
  written directly) and write; a buffer returns to the pool when its last write is done.

Why two stages: a decoder that wrote its own output waited for the device (an ``O_DIRECT`` write blocks
for the disk) while its core idled — with 2 cores and synchronous writes the restore ran at the speed
of decoding *plus* writing. Why pooled buffers: a fresh 4 MiB ``bytes`` per blob is 1,024 page faults
(zeroed pages) — measured 3.6 s of CPU per 1.9 GB on the benchmark machine, as much as decompressing —
and page-aligned memory is what ``O_DIRECT`` writes need (:mod:`.direct`).

Memory is bounded whatever the disk size: a decoder reads its range's blobs one at a time from the
range's single request (``Repository.read_pieces``) into its own buffer of one stored blob, decodes it
into one of the pooled buffers — one per decoder plus :data:`WRITE_SLOTS` being written (blobs are at
most the repository's chunk size) — and the writer queue holds views into those, never copies. With the
defaults (4 workers, 4 MiB chunks): 16 + 24 MiB, whatever the disk and range sizes; ranges can be long
(:data:`MAX_RANGE`), so a restore from S3 makes few requests.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import nbd

from fleece.repository import Piece, Repository
from fleece.repository.errors import IntegrityError
from fleece.repository.index import Location
from fleece.repository.repo import ReadRange
from fleece.repository.workers import WorkQueue, Workers

from .targets import ZERO_GRAIN, Target

MAX_RANGE = 32 << 20  # one GET: streamed blob by blob, so its length costs no memory; still a unit of work
#: read across gaps between wanted blobs of a pack no larger than this: none. A restore from S3 never
#: fetches a byte it does not need (blobs a newer layer replaced sit between needed ones in old packs);
#: the requests a gap costs run in parallel, ``workers`` of them at a time
MAX_GAP = 0
WRITE_SLOTS = 2  # decoded blobs waiting for (or in) the writers, beyond one per decoder
DIRECT_WRITERS = 2  # threads writing a direct target: one waits on the device while the other submits


@dataclass
class FillStats:
    blobs: int = 0
    fetched_bytes: int = 0  # compressed bytes read from the repository
    plain_bytes: int = 0  # bytes decoded and checked (each blob once)
    resumed_bytes: int = 0  # bytes of pieces an interrupted restore wrote already (skipped: --resume)
    data_bytes: int = 0  # bytes written to the target
    zero_bytes: int = 0  # bytes of zeros skipped or written as zero clusters

    def add(self, other: FillStats) -> None:
        """Add *other*'s counts (a chain's layers into its disk's): every field, so none is forgotten."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Slot:
    """One page-aligned buffer holding a decoded blob until its last write is done."""

    __slots__ = ("view", "refs", "lock", "pool")

    def __init__(self, size: int, pool: WorkQueue[_Slot]) -> None:
        self.view = memoryview(mmap.mmap(-1, size))  # anonymous mmap: page-aligned, its pages reused
        self.refs = 0
        self.lock = threading.Lock()
        self.pool = pool

    def hold(self, n: int) -> None:
        self.refs = n

    def release(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.pool.put(self)


class _Pending:
    """The writes of one range read still to be done; the range is durable-to-be once they all are."""

    __slots__ = ("key", "left", "bytes")

    def __init__(self, key: str, left: int, nbytes: int) -> None:
        self.key = key
        self.left = left
        self.bytes = nbytes


@dataclass
class _Write:
    """One write of the writer stage: *data* (a view into *slot*, at *slot_offset* of it) at *offset*;
    ``data is None``: *length* zeros to write (masking an overlay's backing file). *pending*: the range
    read it belongs to (for the resume journal)."""

    offset: int
    length: int
    data: memoryview | None = None
    slot: _Slot | None = None
    slot_offset: int = 0
    pending: _Pending | None = None
    #: no I/O: the end of a range read's writes, so that its completion (and the checkpoint it may be due
    #: for, which needs a writer's connection to flush) always happens in a writer
    marker: bool = False


def range_key(rng: ReadRange) -> str:
    """A range read's name in the resume journal: a pack never changes, so the same key is the same blobs."""
    return f"{rng.pack}:{rng.start}:{rng.end}"


class NullTarget:
    """A target that keeps nothing: ``restore --verify-only`` decodes and checks every blob a restore
    would write, at a restore's speed, without a byte written (a DR drill's timing, or a check that
    a point restores, on a host with no room for the images)."""

    direct_writes = False

    def writer(self) -> NullTarget:
        return self

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        pass

    def zero(self, length: int, offset: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _is_zero(view: memoryview) -> bool:
    return nbd.Buffer.from_buffer(view).is_zero()


def zero_runs(data: memoryview, offset: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_zero)`` runs of *data* (which lands at disk *offset*), in :data:`ZERO_GRAIN`
    blocks aligned to the disk, so a restored image stays as thin as its source; relative to *data*."""
    end = len(data)
    pos = 0
    run_start, run_zero = 0, None
    while pos < end:
        nxt = min(end, (offset + pos) // ZERO_GRAIN * ZERO_GRAIN + ZERO_GRAIN - offset)
        is_zero = _is_zero(data[pos:nxt])
        if run_zero is None:
            run_zero = is_zero
        elif is_zero != run_zero:
            yield run_start, pos, run_zero
            run_start, run_zero = pos, is_zero
        pos = nxt
    if run_zero is not None:
        yield run_start, end, run_zero


#: ``checkpoint(keys)``: the range reads *keys* are written and flushed — record them (the resume journal)
Checkpoint = Callable[[list[str]], None]


def fill(repo: Repository, target: Target, pieces: list[Piece], *, mask: bool, workers: int,
         progress: Callable[[int], None] | None = None, where: str = "", skip: set[str] | None = None,
         checkpoint: Checkpoint | None = None, checkpoint_bytes: int = 256 << 20, hints: Sequence[str] = (),
         located: Mapping[bytes, Location] | None = None) -> FillStats:
    """Write *pieces* into *target*. *mask*: the target is an overlay (zeros must hide older data).

    The blobs are looked up in *located* (what the caller located already), else in the index objects
    *hints* name, else in every index object — never by loading the whole index (``Repository.locate_many``).

    Resuming (:mod:`.journal`): range reads named in *skip* are durable in the target already and are not
    read again; *checkpoint* is called, from a writer thread, with the range reads completed since the last
    call, after the target was flushed, every *checkpoint_bytes* of data."""
    stats = FillStats()
    lock = threading.Lock()
    uses: dict[bytes, list[Piece]] = {}
    zero_pieces = []
    for p in pieces:
        if p.blob is None:
            zero_pieces.append(p)
        else:
            uses.setdefault(p.blob, []).append(p)
    try:
        ranges = repo.plan_reads(uses, MAX_RANGE, MAX_GAP, hints, located)
    except IntegrityError as exc:  # the same error, said where (its object stays: scripts act on it)
        raise IntegrityError(f"{where}: {exc}", object=exc.object) from None
    stats.zero_bytes += sum(p.length for p in zero_pieces)
    if skip:
        done_before = [r for r in ranges if range_key(r) in skip]
        ranges = [r for r in ranges if range_key(r) not in skip]
        stats.resumed_bytes = sum(p.length for r in done_before for blob, _ in r.items for p in uses[blob])
        if progress is not None and stats.resumed_bytes:
            progress(stats.resumed_bytes)
    if not ranges and not (zero_pieces and mask):
        return stats
    completed: list[str] = []
    since = [0]  # data bytes completed since the last checkpoint
    ckpt = threading.Lock()

    def done(pending: _Pending, w: object) -> None:
        """*pending* lost one write; when it has none left, its range joins the next checkpoint, which the
        writer (*w*, whose connection flushes the target) takes once enough data is complete."""
        with lock:
            pending.left -= 1
            if pending.left:
                return
            completed.append(pending.key)
            since[0] += pending.bytes
            due = checkpoint is not None and since[0] >= checkpoint_bytes
        if due:
            take_checkpoint(w)

    def take_checkpoint(w: object) -> None:
        assert checkpoint is not None
        with ckpt:  # one at a time: flush first, then the journal line (never ahead of the disk)
            with lock:
                keys, since[0] = list(completed), 0
                completed.clear()
            if keys:
                w.flush()  # type: ignore[attr-defined]
                checkpoint(keys)

    decoders = max(1, min(workers, len(ranges)))
    direct = getattr(target, "direct_writes", False)
    blob_size = max((loc.raw_length for r in ranges for _, loc in r.items), default=0)
    free: WorkQueue[_Slot] = WorkQueue(decoders + WRITE_SLOTS)
    for _ in range(free.maxsize if blob_size else 0):
        free.put(_Slot(_page_round(blob_size), free))

    def writer() -> Callable[[_Write], None]:
        w = target.writer()  # an NBD connection per thread, or the shared direct file

        def write(job: _Write) -> None:
            try:
                if job.marker:
                    pass
                elif job.data is None:
                    w.zero(job.length, job.offset)
                elif direct:
                    w.pwrite(job.data, job.offset, job.slot_offset % mmap.PAGESIZE == 0)
                else:
                    w.pwrite(job.data, job.offset)
            finally:
                if job.slot is not None:
                    job.slot.release()
            if job.pending is not None:
                done(job.pending, w)
            if progress is not None and job.slot is not None:
                progress(job.length)

        return write

    writers: Workers[_Write] = Workers(writer, workers=DIRECT_WRITERS if direct else max(1, workers),
                                       depth=4 * max(1, workers), name="fleece-restore-write")

    payload_size = _page_round(max((loc.length for r in ranges for _, loc in r.items), default=0))

    def decoder() -> Callable[[ReadRange], None]:
        # one stored payload at a time, read from the range's request as it arrives: a decoder holds one
        # blob's bytes, not a whole range (ranges can then be long: fewer requests for the same memory)
        payload = memoryview(mmap.mmap(-1, max(payload_size, mmap.PAGESIZE)))

        def decode(rng: ReadRange) -> None:
            # one write more than the range makes, dropped when its last job is queued: the range cannot
            # complete while its writes are still being queued
            pending = _Pending(range_key(rng), 1, 0)
            try:
                for blob, loc, stored in repo.read_pieces(rng, payload):
                    _check_pieces(blob, loc.raw_length, uses[blob])
                    slot = free.get(cancel=pool)
                    try:
                        repo.decode_into(blob, loc, stored, slot.view)
                        jobs, written, zeros = _writes(slot, uses[blob], mask)
                    except BaseException:
                        free.put(slot)
                        raise
                    held = sum(1 for job in jobs if job.slot is not None)
                    slot.hold(held)
                    if not held:
                        free.put(slot)
                    with lock:
                        pending.left += len(jobs)
                        pending.bytes += written
                        stats.data_bytes += written
                        stats.zero_bytes += zeros
                    for job in jobs:
                        job.pending = pending
                        writers.submit(job)
                    if progress is not None and zeros:
                        progress(zeros)
            except IntegrityError as exc:
                raise IntegrityError(f"{where}: {exc}", object=exc.object) from None
            with lock:
                stats.blobs += len(rng.items)
                stats.fetched_bytes += rng.end - rng.start
                stats.plain_bytes += sum(loc.raw_length for _, loc in rng.items)
            writers.submit(_Write(0, 0, pending=pending, marker=True))  # drops the extra write, in a writer

        return decode

    pool: Workers[ReadRange] = Workers(decoder, workers=decoders, name="fleece-restore-read")
    pool.link(writers)
    pool.on_close(free.wake)
    pool.on_close(repo.backend.cancel)
    with writers, pool:
        if zero_pieces and mask:
            for p in zero_pieces:
                writers.submit(_Write(p.offset, p.length))
        for rng in ranges:
            pool.submit(rng)
    return stats


def _page_round(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _check_pieces(blob: bytes, length: int, pieces: list[Piece]) -> None:
    """A piece never reads past its blob: the pooled buffer holds another blob's bytes there."""
    for p in pieces:
        if p.skip + p.length > length:
            raise IntegrityError(f"the manifest takes bytes {p.skip}..{p.skip + p.length} of blob {blob.hex()} "
                                 f"(at disk offset {p.offset}), which holds {length}: the point's manifest is "
                                 "damaged; run 'fleece verify'")


def _writes(slot: _Slot, pieces: list[Piece], mask: bool) -> tuple[list[_Write], int, int]:
    """The writes of every piece using the blob in *slot*: its data runs, and its zero runs when the
    target must mask them (an overlay); a fresh target already reads zero there, so they stay holes."""
    jobs: list[_Write] = []
    written = zeros = 0
    for p in pieces:
        view = slot.view[p.skip:p.skip + p.length]
        for start, end, is_zero in zero_runs(view, p.offset):
            if is_zero:
                zeros += end - start
                if mask:
                    jobs.append(_Write(p.offset + start, end - start, slot=None))
            else:
                written += end - start
                jobs.append(_Write(p.offset + start, end - start, view[start:end], slot, p.skip + start))
    return jobs, written, zeros
