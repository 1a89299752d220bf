"""Random access to one disk of a point, straight from the repository: what ``fleece serve`` exports.

A restore writes every byte once, in the repository's order; a served disk is read in the *client's*
order — a guest booting reads a few MiB here and there, ``qemu-img convert`` reads it front to back over
several connections. :class:`PointReader` answers any read from the point's resolved extent map
(:meth:`Repository.resolve`: newest layer wins), so it needs the repository alone, local or S3:

* **Block status** (:meth:`PointReader.extents`) comes from the map — ranges no layer holds data for are
  holes that read as zeros, so ``nbdcopy``/``qemu-img`` skip them and a booting guest never waits on them.
* **Every blob is verified** (decrypted, decompressed, its keyed id checked: ``Repository.decode``) before
  a byte of it is returned. A damaged blob is an :class:`IntegrityError` naming its pack and offset — the
  client gets an I/O error, never wrong bytes — and is never cached, so a read after a transient failure
  tries again.
* **A bounded cache** of decoded blobs (LRU, ``cache_bytes``): a guest rereads the same blocks, and a
  4 KiB read fetches and decodes its whole blob (at most the repository's chunk size).
* **Parallel fetches**: blobs missing from the cache are fetched by a pool of ``workers`` threads,
  neighbouring blobs of one pack in one ranged read (``Repository.plan_reads`` with no gap: never a byte of
  a pack the read does not need); a blob already on its way is waited for, never fetched twice.
* **Read-ahead**: a read that continues a recent one (sequential, on any connection: ``nbdcopy`` and
  ``qemu-img`` interleave their requests over connections) starts fetching the blobs of the next
  ``readahead`` bytes in the background, so a sequential reader finds them decoded.

Thread-safe: nbdkit calls from many threads at once (``THREAD_MODEL_PARALLEL``, multi-conn). The pool's
threads only fetch and decode (zstd, HMAC and AES-GCM release the GIL); a read only copies. Memory:
the cache, plus at most one range read per worker in flight (each decodes into fresh buffers that the
cache then owns).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleece.repository import Manifest, Piece, Repository
from fleece.repository.errors import FleeceError, IntegrityError
from fleece.repository.index import Location
from fleece.repository.repo import ReadRange
from fleece.repository.workers import Workers

from .restore import chain_hints

log = logging.getLogger(__name__)

#: NBD's largest read is 32 MiB (QEMU refuses more); one ranged read of the repository is no longer
MAX_RANGE = 32 << 20
#: a read starting within this many bytes after a recent read's end continues it (sequential)
SEQUENTIAL_SLACK = 1 << 20
#: how many recent read ends are remembered to recognise sequential streams (one per connection and more)
RECENT_READS = 64
#: NBD block status counts must stay below 4 GiB (libnbd refuses a longer extent: FIELD-NOTES §12.12)
MAX_EXTENT = (4 << 30) - (1 << 20)
#: extent types, as NBD (and nbdkit) define them
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3

_ZEROS = bytes(4 << 20)


@dataclass
class ReaderStats:
    """What a reader did so far (for logs, ``serve --json`` and the bench)."""

    reads: int = 0
    read_bytes: int = 0
    hits: int = 0  # blobs a read found decoded in the cache
    waits: int = 0  # blobs a read found on their way (read-ahead, or another connection's read)
    misses: int = 0  # blobs a read had to start fetching itself
    fetches: int = 0  # ranged reads of the repository
    fetched_bytes: int = 0  # stored bytes read from the repository
    blobs: int = 0  # blobs decoded and verified
    prefetched: int = 0  # of them, fetched by read-ahead before any read asked
    errors: int = 0  # blobs that failed (damage, storage errors)
    first_read_s: float | None = None  # seconds from the reader's start to its first read's answer
    started: float = field(default_factory=time.monotonic, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "started"}


class _Fetch:
    """One blob on its way: the reads waiting for it block on :attr:`done`."""

    __slots__ = ("done", "data", "error", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.prefetch = prefetch


class PointReader:
    """One disk of one point, readable at any offset (see the module docstring)."""

    def __init__(self, repo: Repository, point: Manifest, disk: str, *, cache_bytes: int = 64 << 20,
                 workers: int = 4, readahead: int = 16 << 20) -> None:
        """*point* is the point holding the disk's newest layer (``Repository.point_view``). The blobs'
        locations are looked up here, once, from the index objects the chain's runs wrote: a reader is
        ready when this returns, and a missing blob is an error now, not in the middle of a boot."""
        self.repo = repo
        self.point = point
        self.disk = disk
        self.size = point.disks[disk].virtual_size
        chain = repo.disk_chain(point, disk)
        self.pieces: list[Piece] = repo.resolve(point, disk)
        self._starts = [p.offset for p in self.pieces]
        hints = chain_hints(chain)
        blobs = list(dict.fromkeys(p.blob for p in self.pieces if p.blob is not None))
        self._where: dict[bytes, Location] = repo.locate_many(blobs, hints)
        self.data_bytes = sum(p.length for p in self.pieces if p.blob is not None)
        largest = max((loc.raw_length for loc in self._where.values()), default=0)
        # the cache must hold what one read (32 MiB) touches, or a read could evict its own blobs
        self.cache_bytes = max(cache_bytes, MAX_RANGE + 2 * largest)
        self.readahead = readahead
        self.stats = ReaderStats()
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._inflight: dict[bytes, _Fetch] = {}
        self._recent: deque[int] = deque(maxlen=RECENT_READS)
        self._workers = workers
        self._pool: Workers[ReadRange] | None = None
        self._closed = False

    # -- the pool ----------------------------------------------------------------------------------------

    def _get_pool(self) -> Workers[ReadRange]:
        """Started on first use, in the serving process (nbdkit may fork after loading the plugin)."""
        with self._lock:
            if self._closed:
                raise FleeceError(f"disk {self.disk}: the server is stopping")
            if self._pool is None:
                self._pool = Workers(self._fetcher, workers=self._workers, depth=4 * self._workers,
                                     name=f"fleece-serve-{self.disk}").start()
            return self._pool

    def close(self) -> None:
        """Stop fetching: waiting reads fail, later ones too (no new pool behind a closing server)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()  # drops queued ranges: their blobs' waiters must not wait for ever
        with self._lock:
            waiting, self._inflight = self._inflight, {}
        for f in waiting.values():
            f.error = FleeceError("the server is stopping")
            f.done.set()

    def _fetcher(self):  # type: ignore[no-untyped-def]
        buf = memoryview(bytearray(max((loc.length for loc in self._where.values()), default=0)))

        def fetch(rng: ReadRange) -> None:
            # never raises: one damaged blob must fail the reads that need it, not the server
            pending = {blob for blob, _ in rng.items}
            try:
                for blob, loc, payload in self.repo.read_pieces(rng, buf):
                    with self._lock:
                        self.stats.fetched_bytes += loc.length
                    try:
                        data = self.repo.decode(blob, loc, payload)
                    except BaseException as exc:
                        self._failed(blob, exc)
                    else:
                        self._arrived(blob, data)
                    pending.discard(blob)
            except BaseException as exc:
                for blob in pending:
                    self._failed(blob, exc)
            finally:
                with self._lock:
                    self.stats.fetches += 1
        return fetch

    def _arrived(self, blob: bytes, data: bytes) -> None:
        with self._lock:
            f = self._inflight.pop(blob, None)
            self.stats.blobs += 1
            if f is not None and f.prefetch:
                self.stats.prefetched += 1
            self._insert(blob, data)
        if f is not None:
            f.data = data
            f.done.set()

    def _failed(self, blob: bytes, exc: BaseException) -> None:
        with self._lock:
            f = self._inflight.pop(blob, None)
            self.stats.errors += 1
        loc = self._where[blob]
        if isinstance(exc, FleeceError):
            where = "" if loc.pack in str(exc) else f" (blob {blob.hex()[:16]} in pack {loc.pack} at {loc.offset})"
            log.error("disk %s: %s%s", self.disk, exc, where)
        else:
            log.error("disk %s: blob %s (pack %s, offset %d) could not be read", self.disk, blob.hex()[:16],
                      loc.pack, loc.offset, exc_info=exc)
        if f is not None:
            f.error = exc
            f.done.set()

    def _insert(self, blob: bytes, data: bytes) -> None:
        """Caller holds the lock."""
        if blob in self._cache:
            return
        self._cache[blob] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _request(self, blobs: Iterable[bytes], prefetch: bool) -> dict[bytes, bytes | _Fetch]:
        """What each of *blobs* is now: its data (cached) or its fetch (started here if need be)."""
        out: dict[bytes, bytes | _Fetch] = {}
        start: list[bytes] = []
        with self._lock:
            for b in blobs:
                if b in out:
                    continue
                data = self._cache.get(b)
                if data is not None:
                    self._cache.move_to_end(b)
                    out[b] = data
                    continue
                f = self._inflight.get(b)
                if f is None:
                    f = self._inflight[b] = _Fetch(prefetch)
                    start.append(b)
                    if not prefetch:
                        self.stats.misses += 1
                out[b] = f
        if start:
            try:
                ranges = self.repo.plan_reads(start, max_range=MAX_RANGE, max_gap=0, located=self._where)
                pool = self._get_pool()
                for rng in ranges:
                    pool.submit(rng)
            except BaseException as exc:  # the pool is closing (shutdown): fail what was not handed over
                for b in start:
                    with self._lock:
                        f = self._inflight.get(b)
                    if f is not None and not f.done.is_set():
                        self._failed(b, exc)
        return out

    # -- reads ------------------------------------------------------------------------------------------

    def _span(self, offset: int, end: int) -> range:
        """Indexes of the pieces overlapping ``[offset, end)``."""
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        if i < len(self.pieces) and self.pieces[i].offset + self.pieces[i].length <= offset:
            i += 1
        j = bisect.bisect_left(self._starts, end, lo=i)
        return range(i, j)

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill *buf* with the disk's bytes at *offset* (all of it: NBD reads are whole), or raise —
        :class:`IntegrityError` for damage — without having returned a byte of a blob that failed."""
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise FleeceError(f"read of {len(buf)} bytes at {offset} is beyond the disk's {self.size} bytes")
        span = self._span(offset, end)
        sequential = self._continues(offset, end)
        wanted = [self.pieces[i].blob for i in span if self.pieces[i].blob is not None]
        got = self._request(wanted, prefetch=False) if wanted else {}
        if sequential and self.readahead:
            self.prefetch(end, self.readahead)
        pos = offset
        with self._lock:
            self.stats.reads += 1
            self.stats.read_bytes += len(buf)
        for i in span:
            p = self.pieces[i]
            lo, hi = max(p.offset, offset), min(p.offset + p.length, end)
            if pos < lo:
                _zero(buf[pos - offset:lo - offset])
            if p.blob is None:
                _zero(buf[lo - offset:hi - offset])
            else:
                data = self._wait(p.blob, got[p.blob])
                start = p.skip + (lo - p.offset)
                buf[lo - offset:hi - offset] = memoryview(data)[start:start + hi - lo]
            pos = hi
        if pos < end:
            _zero(buf[pos - offset:])
        with self._lock:
            if self.stats.first_read_s is None:
                self.stats.first_read_s = round(time.monotonic() - self.stats.started, 3)

    def _wait(self, blob: bytes, have: bytes | _Fetch) -> bytes:
        if isinstance(have, bytes):
            with self._lock:
                self.stats.hits += 1
            return have
        if not have.done.is_set():
            with self._lock:
                self.stats.waits += 1
            have.done.wait()
        if have.error is not None:
            if isinstance(have.error, FleeceError):
                raise have.error
            raise IntegrityError(f"disk {self.disk}: blob {blob.hex()[:16]} could not be read: {have.error}")
        assert have.data is not None
        return have.data

    def _continues(self, offset: int, end: int) -> bool:
        """Whether a read of ``[offset, end)`` continues a recent read; remembers where this one ends."""
        with self._lock:
            hit = any(e <= offset <= e + SEQUENTIAL_SLACK for e in self._recent)
            self._recent.append(end)
            return hit

    def prefetch(self, offset: int, count: int) -> None:
        """Start fetching the blobs of ``[offset, offset + count)`` without waiting (read-ahead, and NBD's
        CACHE command)."""
        stop = min(offset + count, self.size)
        blobs = [self.pieces[i].blob for i in self._span(offset, stop) if self.pieces[i].blob is not None]
        if blobs:
            self._request(blobs, prefetch=True)

    # -- block status -----------------------------------------------------------------------------------

    def extents(self, offset: int, count: int) -> list[tuple[int, int, int]]:
        """``(offset, length, type)`` runs covering ``[offset, offset + count)`` (clipped to the disk):
        :data:`EXTENT_DATA` where a layer holds data, :data:`EXTENT_HOLE_ZERO` elsewhere (zeros, never
        backed up or written as zeros). Neighbouring runs of one type are merged."""
        end = min(offset + count, self.size)
        out: list[tuple[int, int, int]] = []

        def add(lo: int, hi: int, kind: int) -> None:
            if hi <= lo:
                return
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == lo and out[-1][1] + hi - lo <= MAX_EXTENT:
                out[-1] = (out[-1][0], out[-1][1] + hi - lo, kind)
            else:
                while hi - lo > MAX_EXTENT:
                    out.append((lo, MAX_EXTENT, kind))
                    lo += MAX_EXTENT
                out.append((lo, hi - lo, kind))

        pos = offset
        for i in self._span(offset, end):
            p = self.pieces[i]
            lo, hi = max(p.offset, offset), min(p.offset + p.length, end)
            add(pos, lo, EXTENT_HOLE_ZERO)
            add(lo, hi, EXTENT_DATA if p.blob is not None else EXTENT_HOLE_ZERO)
            pos = hi
        add(pos, end, EXTENT_HOLE_ZERO)
        return out


def _zero(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        view[pos:pos + step] = _ZEROS[:step]
        pos += step
