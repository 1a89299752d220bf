"""Restore targets written by fleece itself with ``pwrite`` — no NBD hop, no page cache for the bulk.

Why: on the benchmark machine a restore through ``qemu-nbd`` cost 4.5 s for 1.9 GB where decoding it
costs 1.9 s: every byte crossed a unix socket into qemu-nbd's single thread. Buffered writes are no
better there: 1.9 GB written through the page cache and fsync'ed took 7.6 s (dirty-page write-back on a
virtual disk), the same bytes with ``O_DIRECT`` 1.4 s. So the bulk of a restore goes straight to the file
with ``O_DIRECT``: every write whose file offset, memory address and length are multiples of
:data:`ALIGN` (restore decodes into page-aligned buffers, and blobs start on the disk's cluster grid, so
nearly every byte qualifies). The unaligned head and tail of a write (a 512-byte guest write merged into
a flat view, say) go through a second, buffered descriptor. No page is written both ways: a page a direct
write covers lies wholly inside that write, which no other write overlaps (restore writes each byte of a
target once). Both descriptors are the same inode, so one ``fsync`` at the end makes everything durable.

Two targets use it:

* :class:`RawTarget`: a sparse raw file, identity mapping.
* :class:`PreallocatedQcow2`: a qcow2 whose metadata ``qemu-img create -o preallocation=metadata`` wrote —
  every cluster already has its place in the file, which ``qemu-img map`` tells. fleece writes guest
  data at those places and never produces qcow2 metadata itself: the image is what QEMU made, with data
  where QEMU's own tables point. Clusters never written stay holes of the file and read as zeros (QEMU
  reports them as zero: ``qemu-img map``/``convert`` keep them thin). The price: the file's apparent size
  is the virtual size (its disk usage is the data), and the preallocated tables cost about 1/8000 of the
  virtual size to make — which is why restore uses it only for dense disks (see
  :func:`fleece.restore.restore.direct_worthwhile`) and serves sparse ones through qemu-nbd.

A filesystem without ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE mounts) gets buffered writes
throughout, the same bytes.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from fleece.repository.errors import RestoreError

from .targets import FILE_MODE, create_file, create_qcow2, qemu_img

log = logging.getLogger(__name__)

#: alignment of direct writes: file offset, memory address and length (4096 satisfies every device's
#: logical block size; the kernel's own minimum may be 512, but 4096 costs nothing here)
ALIGN = 4096


class DirectFile:
    """One file written at *host* offsets by many threads: ``O_DIRECT`` where aligned, buffered elsewhere.

    *extents* maps guest ranges to file offsets — ``[(guest start, length, file offset)]`` sorted by
    guest start; ``None`` is the identity (a raw file). Thread-safe: ``pwrite`` needs no lock.
    """

    def __init__(self, path: Path, extents: list[tuple[int, int, int]] | None = None) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise RestoreError(f"cannot open {path}: {exc.strerror}", object=str(path)) from None
        self._direct: int | None = None
        try:
            self._direct = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(self._fd)
                raise RestoreError(f"cannot open {path}: {exc.strerror}") from None
            log.debug("%s: no O_DIRECT on this filesystem, buffered writes", path)
        self._extents = extents
        self._starts = [e[0] for e in extents] if extents is not None else []
        self.direct_bytes = 0  # what went around the page cache (for the tests and the log)

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def write(self, data: memoryview, offset: int, aligned_memory: bool) -> None:
        """Write *data* at guest *offset*. *aligned_memory*: ``data`` starts at an :data:`ALIGN`-aligned
        address (restore's buffers are page-aligned; the caller knows where in them *data* starts)."""
        if self._extents is None:
            self._write(data, offset, aligned_memory)
            return
        while data:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i < 0 or offset >= self._extents[i][0] + self._extents[i][1]:
                raise RestoreError(f"{self.path}: guest offset {offset} has no place in the preallocated image")
            start, length, host = self._extents[i]
            n = min(len(data), start + length - offset)
            self._write(data[:n], host + offset - start, aligned_memory)
            aligned_memory = aligned_memory and n % ALIGN == 0
            data, offset = data[n:], offset + n

    def _write(self, data: memoryview, pos: int, aligned_memory: bool) -> None:
        # memory and file offset move together: an aligned buffer at an unaligned file offset never lines up
        if self._direct is None or not aligned_memory or pos % ALIGN:
            self._pwrite(self._fd, data, pos)
            return
        middle = len(data) // ALIGN * ALIGN
        if middle:
            self._pwrite(self._direct, data[:middle], pos)
            self.direct_bytes += middle
        if middle < len(data):
            self._pwrite(self._fd, data[middle:], pos + middle)

    @staticmethod
    def _pwrite(fd: int, data: memoryview, pos: int) -> None:
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n

    def zero(self, length: int, offset: int) -> None:
        """Zeros written as data (a fresh file reads as zero already: restore never needs this on one)."""
        block = memoryview(bytes(min(length, 1 << 20)))
        while length > 0:
            n = min(length, len(block))
            self.write(block[:n], offset, False)
            offset += n
            length -= n

    def sync(self) -> None:
        """Make every write returned so far durable (both descriptors are one inode: one fdatasync)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Make the bytes durable (one fsync: both descriptors are one inode) and close."""
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            if self._direct is not None:
                os.close(self._direct)


class _Handle:
    """What a fill worker writes through (the :class:`~fleece.restore.targets.Writer` protocol)."""

    def __init__(self, file: DirectFile) -> None:
        self.file = file

    def pwrite(self, data: memoryview | bytes, offset: int, aligned_memory: bool = False) -> None:
        self.file.write(memoryview(data), offset, aligned_memory)

    def zero(self, length: int, offset: int) -> None:
        self.file.zero(length, offset)

    def flush(self) -> None:
        self.file.sync()

    def close(self) -> None:
        pass


class RawTarget:
    """A sparse raw file of *size* bytes, private from its first instant (``create_file``)."""

    direct_writes = True  #: restore may hand it page-aligned buffers' views (see fill)

    def __init__(self, path: Path, size: int, mode: int = FILE_MODE, *, existing: bool = False) -> None:
        self.path = path
        if not existing:
            fd = create_file(path, mode, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        elif not path.is_file() or path.is_symlink() or path.stat().st_size != size:
            raise RestoreError(f"{path} is not the sparse raw image of {size} bytes a restore was writing")
        self.file = DirectFile(path)

    @classmethod
    def reopen(cls, path: Path, size: int) -> RawTarget:
        """The raw image an interrupted restore was writing (``--resume``)."""
        return cls(path, size, existing=True)

    def writer(self) -> _Handle:
        return _Handle(self.file)

    def close(self) -> None:
        self.file.close()


class PreallocatedQcow2:
    """A qcow2 with preallocated metadata (see the module docstring), data written by fleece."""

    direct_writes = True

    def __init__(self, path: Path, size: int, options: dict[str, Any], mode: int = FILE_MODE, *,
                 existing: bool = False) -> None:
        self.path = path
        if not existing:
            create_qcow2(path, size, options, mode=mode, preallocation="metadata")
        elif path.is_symlink() or not path.is_file():
            raise RestoreError(f"{path} is not the image a restore was writing")
        self.file = DirectFile(path, guest_to_host(path, size))

    @classmethod
    def reopen(cls, path: Path, size: int) -> PreallocatedQcow2:
        """The image an interrupted restore was writing (``--resume``): its metadata is QEMU's, untouched
        since ``qemu-img create`` (fleece only writes data), so it is as consistent as it was then."""
        return cls(path, size, {}, existing=True)

    def writer(self) -> _Handle:
        return _Handle(self.file)

    def close(self) -> None:
        self.file.close()
        # Nothing of QEMU's changed, but the image is only accepted as QEMU sees it: consistent.
        qemu_img("check", "-q", "-f", "qcow2", str(self.path))


def guest_to_host(path: Path, size: int) -> list[tuple[int, int, int]]:
    """``[(guest start, length, file offset)]`` of a fully preallocated qcow2, from ``qemu-img map``;
    an image where some range has no place in the file is refused (it was not made by
    ``preallocation=metadata``)."""
    extents = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(path))):
        if not e.get("data") or "offset" not in e:
            raise RestoreError(f"{path}: guest range {e['start']}+{e['length']} is not preallocated")
        extents.append((int(e["start"]), int(e["length"]), int(e["offset"])))
    if sum(n for _, n, _ in extents) != size:
        raise RestoreError(f"{path}: qemu-img map covers {sum(n for _, n, _ in extents)} of {size} bytes")
    return extents
