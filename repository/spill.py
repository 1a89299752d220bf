"""A pack being built, kept in a private temporary file instead of the process's memory.

Why: a backup fills one pack while earlier ones upload, so with 20 MiB packs and three uploads in
flight it held four pack buffers — 100 MiB of anonymous memory, two thirds of its peak RSS, growing
with ``pack_target`` and the upload parallelism. A :class:`Spill` keeps those bytes in the page
cache of an unnamed file: the kernel may write them back and reclaim them under pressure (anonymous
memory it can only swap), they are not charged to the process's RSS, and the process holds only the
piece it is copying. Each pack's life is short (built, uploaded, truncated within a second or two),
so in practice the pages never reach the disk.

Privacy: the file is made with ``tempfile.TemporaryFile`` — ``O_TMPFILE`` where the filesystem has it
(no name at any moment), otherwise a random ``0600`` name unlinked at once — in the directory given
(the caller's private run directory when it has one) or ``$TMPDIR``.

A spill is the one non-buffer :data:`~.backends.base.Data` a backend's ``put`` takes: backends read
it in pieces with :func:`pieces` (and :func:`data_size`), never as a whole. Retries re-read it from
the start, so a spill stays valid until its builder is reset.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator


class Spill:
    """Bytes in an unnamed private file: :meth:`write` appends, readers use :meth:`readinto` at offsets."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)  # 0600, unnamed or unlinked at once
        self._fd = self._file.fileno()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append *data* (a short write is retried: pwrite may write less to a full filesystem once)."""
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self._fd, view, self.size)
            self.size += n
            view = view[n:]

    def readinto(self, offset: int, out: memoryview) -> int:
        """Fill *out* from *offset*; returns the byte count (less only at the end of the spill)."""
        want = min(len(out), self.size - offset)
        done = 0
        while done < want:
            n = os.preadv(self._fd, [out[done:want]], offset + done)
            if n == 0:
                raise OSError(f"spill file ended at {offset + done} of {self.size} bytes")
            done += n
        return done

    def read(self, offset: int, length: int) -> bytes:
        """*length* bytes at *offset* (fewer at the end)."""
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def __bytes__(self) -> bytes:
        return self.read(0, self.size)

    def reset(self) -> None:
        """Empty the file (its page-cache pages are freed, not written back)."""
        os.ftruncate(self._fd, 0)
        self.size = 0

    def close(self) -> None:
        self._file.close()


def data_size(data: bytes | bytearray | memoryview | Spill) -> int:
    """The byte count of a backend's ``put`` data, whichever kind it is."""
    return len(data) if isinstance(data, Spill) else memoryview(data).nbytes


def pieces(data: bytes | bytearray | memoryview | Spill, buf: memoryview, start: int = 0,
           end: int | None = None) -> Iterator[memoryview]:
    """Successive pieces of ``data[start:end]``, each at most ``len(buf)`` bytes: views into *data*
    itself when it is a buffer, or *buf* refilled from the spill (valid until the next piece)."""
    size = data_size(data)
    end = size if end is None else min(end, size)
    if isinstance(data, Spill):
        pos = start
        while pos < end:
            n = data.readinto(pos, buf[:min(len(buf), end - pos)])
            yield buf[:n]
            pos += n
        return
    view = memoryview(data).cast("B")
    for pos in range(start, end, max(1, len(buf))):
        yield view[pos:min(end, pos + len(buf))]
