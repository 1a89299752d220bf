"""The blob writer: hash → dedup → compress → pack → upload, in parallel and with bounded memory.

One writer serves one backup run. Callers hand it plaintext blobs (at most one chunk each) with
:meth:`BlobWriter.add`, which blocks while too much is in flight — that back-pressure is what keeps the
memory of a backup independent of the disk size. A pool of threads (one zstd context each; zstandard
and hashlib release the GIL) encodes blobs into the current pack; full packs go to a small upload pool.

:meth:`BlobWriter.flush` is the first half of the commit protocol: when it returns, every pack is durable
and the run's index object is written, so the caller may write its manifest (the commit point).
A writer that is aborted or fails leaves only unreferenced packs behind (garbage for GC), never a point.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .backends.base import Backend, Data
from .codec import CodecPool, Encoded, blob_id
from .config import RepoConfig
from .errors import FleeceError, RepositoryError
from .index import Index, encode_index
from .pack import PackBuilder, PackEntry, pack_name, table_span

#: Most blobs one pack may hold (bounds the table of packs full of tiny, well-compressed blobs).
MAX_PACK_ENTRIES = 16384

#: Called from a worker thread once a blob is packed or found to be a duplicate:
#: ``done(blob id, stored bytes)`` where stored bytes is 0 for a duplicate.
BlobDone = Callable[[bytes, int], None]


@dataclass
class WriterStats:
    raw_bytes: int = 0  # plaintext submitted
    new_blobs: int = 0
    stored_bytes: int = 0  # compressed payload of new blobs
    dedup_blobs: int = 0
    dedup_bytes: int = 0  # plaintext that was already in the repository (or earlier in this run)
    packs: int = 0
    uploaded_bytes: int = 0  # every byte PUT: packs with their tables, plus the index

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BlobWriter:
    """Packs blobs into the repository. Thread-safe :meth:`add`; single :meth:`flush` or :meth:`abort`."""

    def __init__(self, backend: Backend, config: RepoConfig, index: Index, *, threads: int | None = None,
                 uploads: int | None = None, pending: int | None = None) -> None:
        self.backend = backend
        self.config = config
        self.index = index
        self.stats = WriterStats()
        threads = threads or os.cpu_count() or 2
        uploads = uploads or backend.parallelism
        self._codecs = CodecPool(config.compression.get("level", 3))
        self._encode_pool = ThreadPoolExecutor(threads, thread_name_prefix="fleece-zstd")
        self._upload_pool = ThreadPoolExecutor(uploads, thread_name_prefix="fleece-put")
        # Memory bound: blobs waiting or being encoded, plus one pack buffer per upload and one being
        # filled. Taking a free pack buffer blocks while all are uploading: that is the back-pressure.
        self._blob_slots = threading.BoundedSemaphore(pending or threads + 2)
        capacity = config.pack_target + config.chunk_size + table_span(MAX_PACK_ENTRIES)
        self._free: queue.Queue[PackBuilder] = queue.Queue()
        for _ in range(uploads + 1):
            self._free.put(PackBuilder(capacity))
        self._builder: PackBuilder | None = None
        self._lock = threading.Lock()  # stats, dedup set, in-flight count; never held while blocking
        self._pack_lock = threading.Lock()  # filling the current pack; may block for a free buffer
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._pending_ids: set[bytes] = set()
        self._written: list[tuple[str, list[PackEntry]]] = []
        self._error: BaseException | None = None
        self._closed = False

    # -- public API -------------------------------------------------------------------------------------

    def add(self, data: Data, done: BlobDone | None = None) -> None:
        """Queue one blob (≤ chunk_size bytes). Blocks while the pipeline is full; raises a worker's error."""
        if len(data) > self.config.chunk_size:
            raise ValueError(f"blob of {len(data)} bytes exceeds the chunk size {self.config.chunk_size}")
        self._raise_if_failed()
        if self._closed:
            raise RepositoryError("writer already flushed or aborted")
        self._blob_slots.acquire()
        with self._lock:
            self._in_flight += 1
        try:
            self._encode_pool.submit(self._encode, data, done)
        except BaseException:
            self._release_blob()
            raise

    def flush(self) -> WriterStats:
        """Finish: upload the last pack, wait for every upload, write the index. Returns the run's stats."""
        with self._idle:
            while self._in_flight and self._error is None:
                self._idle.wait(0.5)
        self._raise_if_failed()
        self._closed = True
        self._encode_pool.shutdown(wait=True)
        with self._pack_lock:
            if self._builder is not None and len(self._builder):
                self._ship(self._builder)
            self._builder = None
        self._upload_pool.shutdown(wait=True)
        self._raise_if_failed()
        if self._written:
            index_id, data = encode_index(self._written)
            self.backend.put(f"index/{index_id}", data)
            self.stats.uploaded_bytes += len(data)
            for pack_id, entries in self._written:
                self.index.add_pack(pack_id, entries)
        return self.stats

    def abort(self) -> None:
        """Stop as soon as possible; what was uploaded stays unreferenced (garbage for GC)."""
        self._closed = True
        if self._error is None:
            self._error = RepositoryError("backup aborted")
        self._encode_pool.shutdown(wait=True, cancel_futures=True)
        self._upload_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    # -- workers ----------------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None:
            if isinstance(err, FleeceError):
                raise err
            raise RepositoryError(f"writing to the repository failed: {err}") from err

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
            self._idle.notify_all()

    def _release_blob(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()
        self._blob_slots.release()

    def _encode(self, data: Data, done: BlobDone | None) -> None:
        try:
            if self._error is not None:
                return
            ident = blob_id(data)
            with self._lock:
                self.stats.raw_bytes += len(data)
                duplicate = ident in self.index or ident in self._pending_ids
                if duplicate:
                    self.stats.dedup_blobs += 1
                    self.stats.dedup_bytes += len(data)
                else:
                    self._pending_ids.add(ident)
            if duplicate:
                if done is not None:
                    done(ident, 0)
                return
            encoded = self._codecs.get().encode(data, ident)
            self._append(encoded)
            with self._lock:
                self.stats.new_blobs += 1
                self.stats.stored_bytes += len(encoded.payload)
            if done is not None:
                done(ident, len(encoded.payload))
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by _raise_if_failed
            self._fail(exc)
        finally:
            self._release_blob()

    def _take_builder(self) -> PackBuilder:
        while True:
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                if self._error is not None:
                    raise _Aborted from None

    def _append(self, encoded: Encoded) -> None:
        with self._pack_lock:
            if self._builder is None:
                self._builder = self._take_builder()
            if not self._builder.fits(encoded) or len(self._builder) >= MAX_PACK_ENTRIES:
                self._ship(self._builder)
                self._builder = None
                self._builder = self._take_builder()
            self._builder.add(encoded)
            if self._builder.size >= self.config.pack_target:
                self._ship(self._builder)
                self._builder = None

    def _ship(self, builder: PackBuilder) -> None:
        pack_id, data, entries = builder.finish()
        try:
            self._upload_pool.submit(self._upload, builder, pack_id, data, entries)
        except BaseException:
            builder.reset()
            self._free.put(builder)
            raise

    def _upload(self, builder: PackBuilder, pack_id: str, data: memoryview, entries: list[PackEntry]) -> None:
        try:
            if self._error is not None:
                return
            self.backend.put(pack_name(pack_id), data)
            with self._lock:
                self._written.append((pack_id, entries))
                self.stats.packs += 1
                self.stats.uploaded_bytes += len(data)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            builder.reset()
            self._free.put(builder)


class _Aborted(Exception):
    """Internal: a worker stops because the run already failed."""
