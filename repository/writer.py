"""The blob writer: hash → dedup → compress → pack → upload, in parallel and with bounded memory.

One writer serves one backup run. Callers hand it plaintext blobs (at most one chunk each) with
:meth:`BlobWriter.add`, which blocks while too much is in flight — that back-pressure is what keeps the
memory of a backup independent of the disk size. A pool of threads (one zstd context each; zstandard
and hashlib release the GIL) encodes blobs into the current pack; full packs go to a small upload pool.
Both pools are one run of ``workers.Workers``: the first failure of either stops both at once and
reaches the caller from :meth:`~BlobWriter.add` or :meth:`~BlobWriter.flush`.

:meth:`BlobWriter.flush` is the first half of the commit protocol: when it returns, every pack is durable
and the run's index object is written, so the caller may write its manifest (the commit point).
A writer that is aborted or fails leaves only unreferenced packs behind (garbage for GC), never a point.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .backends.base import Backend, Data
from .codec import Codec, Encoded
from .config import RepoConfig
from .envelope import Envelope
from .errors import FleeceError, RepositoryError
from .index import Index, encode_index
from .pack import PackBuilder, PackEntry, Stage, pack_name
from .spill import Spill
from .workers import Closed, WorkQueue, Workers

#: Most blobs one pack may hold (bounds the table of packs full of tiny, well-compressed blobs).
MAX_PACK_ENTRIES = 16384

#: Called from a worker thread once a blob is packed or found to be a duplicate:
#: ``done(blob id, stored bytes)`` where stored bytes is 0 for a duplicate.
BlobDone = Callable[[bytes, int], None]

_Blob = tuple[Data, BlobDone | None]
_Upload = tuple[PackBuilder, str, Spill, list[PackEntry], bytes]

#: ``on_committed(raw bytes, stored bytes)``, from a worker thread: plaintext now durable in the repository
#: — a pack's blobs once its upload finished (stored: the pack's size), a duplicate when found (stored 0).
Committed = Callable[[int, int], None]


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
                 uploads: int | None = None, pending: int | None = None, on_committed: Committed | None = None,
                 envelope: Envelope | None = None, exclude: set[str] | None = None,
                 known: set[bytes] | None = None, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.backend = backend
        self.config = config
        self.index = index
        #: packs never deduplicated against (condemned by a prune: ``repository.gc``)
        self._exclude = exclude or set()
        #: blob ids known to be stored without a location (an incremental's parent chain: a point that
        #: exists needs them, so prune keeps them) — deduplicated against like indexed blobs
        self._known = known or set()
        #: packs holding blobs this run deduplicated against through the index (the commit check's)
        self._dedup_packs: set[str] = set()
        self.envelope = envelope or Envelope()
        self.stats = WriterStats()
        self._on_committed = on_committed
        threads = threads or os.cpu_count() or 2
        uploads = uploads or backend.parallelism
        self._level = config.compression.get("level", 3)
        # Memory bound: *pending* blobs waiting or being encoded (the queue holds what the encoders do not,
        # at least one). Packs are built in private files (``spill``), one per upload and one being
        # filled: page cache, not the process's memory. add() blocks while the queue is full, and an
        # encoder while every pack is uploading: that is the back-pressure.
        self._encoders: Workers[_Blob] = Workers(self._encoder, workers=threads, name="fleece-zstd",
                                                  depth=max(1, (pending or threads + 2) - threads))
        self._uploaders: Workers[_Upload] = Workers(lambda: self._upload, workers=uploads, depth=uploads + 1,
                                                     name="fleece-put")
        self._encoders.link(self._uploaders)  # one failure, or abort(), stops both
        self._uploaders.on_close(backend.cancel)  # ...and cuts short an upload's --bwlimit or retry pause
        capacity = (config.pack_target + config.chunk_size + self.envelope.packs.span(MAX_PACK_ENTRIES)
                    + self.envelope.packs.overhead)
        self._free: WorkQueue[PackBuilder] = WorkQueue(uploads + 1)
        stage = Stage()  # blobs are added under _pack_lock, one at a time: one staging buffer for all
        self._builders = [PackBuilder(capacity, self.envelope.packs, spill_dir, stage) for _ in range(uploads + 1)]
        for builder in self._builders:
            self._free.put(builder)
        self._encoders.on_close(self._free.close)  # wakes an encoder waiting for a pack buffer
        self._builder: PackBuilder | None = None
        self._lock = threading.Lock()  # stats, dedup set, written packs; never held while blocking
        self._pack_lock = threading.Lock()  # filling the current pack; may block for a free buffer
        self._pending_ids: set[bytes] = set()
        self._written: list[tuple[str, list[PackEntry], bytes]] = []
        self._aborted = False
        self._closed = False
        #: the run's index object, once :meth:`flush` wrote it (``None``: the run stored no pack)
        self.index_name: str | None = None

    # -- public API -------------------------------------------------------------------------------------

    def add(self, data: Data, done: BlobDone | None = None) -> None:
        """Queue one blob (≤ chunk_size bytes). Blocks while the pipeline is full; raises a worker's error."""
        if len(data) > self.config.chunk_size:
            raise ValueError(f"blob of {len(data)} bytes exceeds the chunk size {self.config.chunk_size}")
        self._raise_if_failed()
        if self._closed:
            raise RepositoryError("writer already flushed or aborted")
        self._uploaders.start()  # threads start with the first blob: a writer never used holds none
        self._encoders.start()
        try:
            self._encoders.submit((data, done))  # a worker's error comes out here as it was raised
        except Closed:
            pass
        else:
            return
        self._raise_if_failed()
        raise RepositoryError("writer already flushed or aborted")

    def flush(self) -> WriterStats:
        """Finish: upload the last pack, wait for every upload, write the index. Returns the run's stats."""
        self._raise_if_failed()
        if self._closed:
            raise RepositoryError("writer already flushed or aborted")
        self._closed = True
        try:
            self._encoders.finish()  # every blob encoded and its done() called
            with self._pack_lock:
                builder, self._builder = self._builder, None
            if builder is not None and len(builder):
                self._ship(builder)
            self._uploaders.finish()  # every pack durable
            cancelled = False
        except Closed:  # abort() from another thread
            cancelled = True
        finally:
            if self._encoders.closed:  # failed or interrupted: no thread may outlive the writer
                self._encoders.abort()
                self._uploaders.abort()
            self._close_builders()
        if cancelled:
            self._raise_if_failed()
            raise RepositoryError("backup aborted")
        if self._written:
            index_id, data = encode_index(self._written, self.envelope.meta)
            self.index_name = f"index/{index_id}"
            self.backend.put(self.index_name, data)
            self.stats.uploaded_bytes += len(data)
            for pack_id, entries, header in self._written:
                self.index.add_pack(pack_id, entries, header=header)
        return self.stats

    def packs_needed(self) -> set[str]:
        """The packs a point made by this run may need: those it wrote and those it deduplicated
        against through the index (blobs it knew from its parent chain need no pack check)."""
        with self._lock:
            return {p for p, _, _ in self._written} | self._dedup_packs

    def written(self) -> list[tuple[str, list[PackEntry], bytes]]:
        """The packs this writer stored: ``(pack id, table, header)`` each (complete after :meth:`flush`)."""
        with self._lock:
            return list(self._written)

    def abort(self) -> None:
        """Stop as soon as possible; what was uploaded stays unreferenced (garbage for GC)."""
        self._closed = True
        self._aborted = True
        self._encoders.abort()  # also closes the linked upload pool and wakes everything waiting
        self._uploaders.abort()
        self._close_builders()

    def _close_builders(self) -> None:
        """Release the packs' files — only once no worker thread can read one any more."""
        if self._encoders.idle and self._uploaders.idle:
            for builder in self._builders:
                builder.close()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    # -- workers ----------------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        err = self._encoders.error  # the run's first error, whichever pool had it
        if err is not None:
            raise err
        if self._aborted:
            raise RepositoryError("backup aborted")

    def _encoder(self) -> Callable[[_Blob], None]:
        """Build one encode worker, with its own zstd context (they are not thread-safe)."""
        codec = Codec(self._level, self.envelope.blob_id)

        def encode(item: _Blob) -> None:
            try:
                self._encode(codec, *item)
            except (FleeceError, Closed):
                raise
            except Exception as exc:
                raise RepositoryError(f"writing to the repository failed: {exc}") from exc

        return encode

    def _encode(self, codec: Codec, data: Data, done: BlobDone | None) -> None:
        ident = self.envelope.blob_id(data)
        with self._lock:
            self.stats.raw_bytes += len(data)
            known = self.index.lookup(ident)
            indexed = known is not None and known.pack not in self._exclude
            duplicate = indexed or ident in self._known or ident in self._pending_ids
            if indexed and ident not in self._known and ident not in self._pending_ids:
                self._dedup_packs.add(known.pack)  # type: ignore[union-attr]
            if duplicate:
                self.stats.dedup_blobs += 1
                self.stats.dedup_bytes += len(data)
            else:
                self._pending_ids.add(ident)
        if duplicate:
            if self._on_committed is not None:
                self._on_committed(len(data), 0)
            if done is not None:
                done(ident, 0)
            return
        encoded = codec.encode(data, ident)
        self._append(encoded)
        with self._lock:
            self.stats.new_blobs += 1
            self.stats.stored_bytes += len(encoded.payload)
        if done is not None:
            done(ident, len(encoded.payload))

    def _take_builder(self) -> PackBuilder:
        return self._free.get()  # Closed once the run stops

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
        self._uploaders.submit((builder, pack_id, data, entries, builder.header))  # the queue never fills: buffers bound it

    def _upload(self, item: _Upload) -> None:
        builder, pack_id, data, entries, header = item
        try:
            self.backend.put(pack_name(pack_id), data)
            with self._lock:
                self._written.append((pack_id, entries, header))
                self.stats.packs += 1
                self.stats.uploaded_bytes += len(data)
            if self._on_committed is not None:
                self._on_committed(sum(e.raw_length for e in entries), len(data))
        except FleeceError:
            raise
        except Exception as exc:
            raise RepositoryError(f"writing to the repository failed: {exc}") from exc
        finally:
            builder.reset()
            try:
                self._free.put(builder)
            except Closed:
                pass  # the run stopped: nobody waits for the buffer any more
