"""Parallel NBD reads of a frozen disk into the repository writer.

``workers`` threads, each with its own libnbd connection to the read-only export (QEMU allows multi-conn
on those), each keeping a few jobs' reads in flight as 1 MiB AIO requests (the measured sweet spot:
4 MiB requests cost QEMU twice the CPU) with completion callbacks (scanning cookies is ~3× slower).
libnbd, hashlib and zstandard all release the GIL, so readers, hashing and compression overlap.

Reads land directly in pooled chunk buffers; a buffer returns to the pool when the writer has packed or
deduplicated its blob. The pool is the memory bound of the whole pull, whatever the disk size.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import nbd

from fleece.repository.writer import BlobWriter

from fleece.repository.errors import ExportReadError
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
    """Fixed set of chunk-sized buffers; :meth:`get` blocks while all are in use."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(count):
            buf = bytearray(size)
            self._free.put(_Slot(buf, memoryview(buf), nbd.Buffer.from_buffer(buf)))

    def get(self, stop: threading.Event) -> _Slot:
        while True:
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None

    def put(self, slot: _Slot) -> None:
        self._free.put(slot)


class _Stopped(Exception):
    pass


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
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._jobs: Iterator[Job] = iter(())
        self._jobs_lock = threading.Lock()

    def connect(self) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(self.export_name)
        h.set_pread_initialize(False)  # we overwrite every byte we ask for
        h.connect_unix(self.socket_path)
        return h

    def run(self, jobs: Iterable[Job], record: Record) -> None:
        """Read every job; returns when all blobs are handed to the writer. Raises the first failure."""
        self._jobs = iter(jobs)
        threads = [threading.Thread(target=self._worker, args=(record,), name=f"fleece-nbd-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            self._stop.set()  # Ctrl-C: let workers notice, then unwind
            for t in threads:
                t.join(10)
            raise
        if self._errors:
            raise self._errors[0]

    def _next_job(self) -> Job | None:
        with self._jobs_lock:
            return next(self._jobs, None)

    def _fail(self, exc: BaseException) -> None:
        self._errors.append(exc)
        self._stop.set()

    def _worker(self, record: Record) -> None:
        try:
            h = self.connect()
        except nbd.Error as exc:
            self._fail(ExportReadError(f"cannot connect to the NBD export of disk {self.disk}: {exc}"))
            return
        inflight: list[_InFlight] = []
        try:
            exhausted = False
            while not self._stop.is_set():
                while not exhausted and len(inflight) < JOBS_IN_FLIGHT:
                    job = self._next_job()
                    if job is None:
                        exhausted = True
                        break
                    inflight.append(self._submit(h, job))
                if not inflight:
                    break
                while not any(f.pending == 0 for f in inflight):
                    h.poll(-1)
                finished = [f for f in inflight if f.pending == 0]
                inflight = [f for f in inflight if f.pending != 0]
                for f in finished:
                    self._finish(f, record)
        except _Stopped:
            pass
        except nbd.Error as exc:
            self._fail(ExportReadError(f"reading the frozen view of disk {self.disk} failed: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - the writer's errors end the run the same way
            self._fail(exc)
        finally:
            # In-flight requests die with the handle; their buffers must not go back before that.
            del h
            for f in inflight:
                self.pool.put(f.slot)

    def _submit(self, h: nbd.NBD, job: Job) -> _InFlight:
        slot = self.pool.get(self._stop)
        f = _InFlight(job, slot)
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
                h.aio_pread(nbd.Buffer.from_buffer(view[rel:rel + n]), off,
                            completion=lambda err, f=f: self._completed(f, err))
                off += n
        return f

    @staticmethod
    def _completed(f: _InFlight, err: object) -> int:
        value = getattr(err, "value", 0)
        if value and not f.error:
            f.error = value
        f.pending -= 1
        return 1  # auto-retire the command

    def _finish(self, f: _InFlight, record: Record) -> None:
        job, slot = f.job, f.slot
        if f.error:
            self.pool.put(slot)
            raise ExportReadError(
                f"reading disk {self.disk} at offset {job.offset} failed: {os.strerror(f.error)}. "
                "The guest is unaffected; if it was writing heavily, the fleece scratch area may be full "
                "or too slow (use --scratch on a faster filesystem with room for the data overwritten "
                "during the backup)")
        if self.progress is not None:
            self.progress(job.length)
        if slot.nbdbuf.is_zero(0, job.length):
            self.pool.put(slot)
            record(job, None, 0)
            return

        def done(ident: bytes, stored: int, job: Job = job, slot: _Slot = slot) -> None:
            self.pool.put(slot)
            record(job, ident, stored)

        self.writer.add(slot.view[:job.length], done)
