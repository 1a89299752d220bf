"""Parallel NBD reads of a frozen disk into the repository writer.

``workers`` threads, each with its own libnbd connection to the read-only export (QEMU allows multi-conn
on those), each keeping a few jobs' reads in flight as 1 MiB AIO requests (the measured sweet spot:
4 MiB requests cost QEMU twice the CPU) with completion callbacks (scanning cookies is ~3× slower).
libnbd, hashlib and zstandard all release the GIL, so readers, hashing and compression overlap.

Reads land directly in pooled chunk buffers; a buffer returns to the pool when the writer has packed or
deduplicated its blob. The pool is the memory bound of the whole pull, whatever the disk size.
Jobs reach the readers through one bounded ``workers.Workers`` queue: the first failure (or Ctrl-C)
closes it and wakes every reader, including one waiting for a buffer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass

import nbd

from fleece.repository.errors import ExportReadError
from fleece.repository.workers import Closable, WorkQueue, Workers
from fleece.repository.writer import BlobWriter

from .plan import Job

log = logging.getLogger(__name__)

REQUEST = 1 << 20
JOBS_IN_FLIGHT = 2  # per connection: the next job's reads run while the last one is handed over

#: ``record(job, blob id or None for all-zero, stored bytes)`` — called from worker/writer threads.
Record = Callable[[Job, bytes | None, int], None]


@dataclass
class _Slot:
    buf: bytearray
    view: memoryview
    nbdbuf: nbd.Buffer  # only for its fast is_zero()


class BufferPool:
    """Fixed set of chunk-sized buffers; :meth:`get` blocks while all are in use.

    One pool serves every disk of a backup, and buffers come back from the writer's threads after the
    pull that took them may have ended, so the pool itself is never closed: a waiting :meth:`get` is
    cancelled by the closing of the pull's own run instead (:meth:`watch`).
    """

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: WorkQueue[_Slot] = WorkQueue(count)
        for _ in range(count):
            buf = bytearray(size)
            self._free.put(_Slot(buf, memoryview(buf), nbd.Buffer.from_buffer(buf)))

    def watch(self, run: Closable) -> None:
        """Make the closing of *run* wake the :meth:`get` calls that wait on its behalf."""
        run.on_close(self._free.wake)

    def get(self, run: Closable) -> _Slot:
        """A free buffer; raises ``workers.Closed`` as soon as *run* (watched) is closed."""
        return self._free.get(cancel=run)

    def put(self, slot: _Slot) -> None:
        self._free.put(slot)


class _InFlight:
    __slots__ = ("job", "slot", "pending", "error")

    def __init__(self, job: Job, slot: _Slot) -> None:
        self.job = job
        self.slot = slot
        self.pending = 0
        self.error = 0


class Puller:
    """Reads the jobs of one exported disk and feeds their blobs to *writer*."""

    def __init__(self, socket_path: str, export_name: str, writer: BlobWriter, pool: BufferPool, *,
                 workers: int = 4, disk: str = "", progress: Callable[[int], None] | None = None) -> None:
        self.socket_path = socket_path
        self.export_name = export_name
        self.writer = writer
        self.pool = pool
        self.workers = workers
        self.disk = disk
        self.progress = progress

    def connect(self) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(self.export_name)
        h.set_pread_initialize(False)  # we overwrite every byte we ask for
        h.connect_unix(self.socket_path)
        return h

    def run(self, jobs: Iterable[Job], record: Record) -> None:
        """Read every job; returns when all blobs are handed to the writer. Raises the first failure."""
        count = min(self.workers, max(1, len(jobs))) if isinstance(jobs, Sized) else self.workers
        readers: Workers[Job] = Workers(lambda: _Reader(self, record, readers), workers=count,
                                        depth=count * JOBS_IN_FLIGHT, name="fleece-nbd")
        self.pool.watch(readers)  # a reader waiting for a buffer wakes when the run fails or is cancelled
        with readers:
            for job in jobs:
                readers.submit(job)


class _Reader:
    """One worker of a pull: its own NBD connection, up to ``JOBS_IN_FLIGHT`` jobs' reads in flight."""

    def __init__(self, puller: Puller, record: Record, run: Closable) -> None:
        self.puller = puller
        self.record = record
        self.run = run
        try:
            self.h = puller.connect()
        except nbd.Error as exc:
            raise ExportReadError(f"cannot connect to the NBD export of disk {puller.disk}: {exc}") from None
        self.inflight: list[_InFlight] = []

    def __call__(self, job: Job) -> None:
        try:
            self._submit(job)
            while len(self.inflight) >= JOBS_IN_FLIGHT:
                self._complete()
        except nbd.Error as exc:
            raise ExportReadError(f"reading the frozen view of disk {self.puller.disk} failed: {exc}") from None

    def finish(self) -> None:
        try:
            while self.inflight:
                self._complete()
        except nbd.Error as exc:
            raise ExportReadError(f"reading the frozen view of disk {self.puller.disk} failed: {exc}") from None

    def close(self) -> None:
        # In-flight requests die with the handle; their buffers must not go back before that.
        del self.h
        for f in self.inflight:
            self.puller.pool.put(f.slot)
        self.inflight = []

    def _submit(self, job: Job) -> None:
        slot = self.puller.pool.get(self.run)
        f = _InFlight(job, slot)
        self.inflight.append(f)  # from here on close() gives the buffer back
        view = slot.view
        # Zero the parts of the cell that will not be read (holes of a full's cell).
        pos = job.offset
        for off, length in job.reads:
            if off > pos:
                view[pos - job.offset: off - job.offset] = bytes(off - pos)
            pos = off + length
        if pos < job.offset + job.length:
            view[pos - job.offset: job.length] = bytes(job.offset + job.length - pos)
        for off, length in job.reads:
            end = off + length
            while off < end:
                n = min(REQUEST, end - off)
                rel = off - job.offset
                f.pending += 1
                self.h.aio_pread(nbd.Buffer.from_buffer(view[rel:rel + n]), off,
                                 completion=lambda err, f=f: self._completed(f, err))
                off += n

    @staticmethod
    def _completed(f: _InFlight, err: object) -> int:
        value = getattr(err, "value", 0)
        if value and not f.error:
            f.error = value
        f.pending -= 1
        return 1  # auto-retire the command

    def _complete(self) -> None:
        """Wait until at least one job's reads are all done, then hand every such job over."""
        while not any(f.pending == 0 for f in self.inflight):
            self.h.poll(-1)
        for f in [f for f in self.inflight if f.pending == 0]:
            self.inflight.remove(f)
            self._hand_over(f)

    def _hand_over(self, f: _InFlight) -> None:
        job, slot, pool = f.job, f.slot, self.puller.pool
        disk = self.puller.disk
        if f.error:
            pool.put(slot)
            raise ExportReadError(
                f"reading disk {disk} at offset {job.offset} failed: {os.strerror(f.error)}. "
                "The guest is unaffected; if it was writing heavily, the fleece scratch area may be full "
                "or too slow (use --scratch on a faster filesystem with room for the data overwritten "
                "during the backup)")
        if self.puller.progress is not None:
            self.puller.progress(job.length)
        if slot.nbdbuf.is_zero(0, job.length):
            pool.put(slot)
            self.record(job, None, 0)
            return
        record = self.record

        def done(ident: bytes, stored: int, job: Job = job, slot: _Slot = slot) -> None:
            pool.put(slot)
            record(job, ident, stored)

        try:
            self.puller.writer.add(slot.view[:job.length], done)
        except BaseException:
            pool.put(slot)  # add() took nothing: done will never run
            raise
