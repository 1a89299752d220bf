"""The resume journal of one disk's restore: which range reads are written *and durable* in its partial images.

A restore of hundreds of GB from a bucket can lose its network, or its user's patience, at 90 %.
``fleece restore --resume`` continues where an interrupted restore (Ctrl-C, SIGTERM, the storage gone
after its retries, a SIGKILL) stopped, skipping what it already wrote. What may be skipped is only what
this journal says, and the journal says only what is safe:

* its first line names the restore (VM, point, disk, mode, format, the repository's id): a journal of
  another restore is never continued — that restore starts over;
* a range read (``pack:start:end`` — a pack never changes, so the same key is the same blobs, which were
  checked against their ids when they were decoded) is appended only after every write it made has
  returned *and* the image was flushed (``fdatasync``, or an NBD flush: QEMU's flush covers every write
  completed before it on any connection) — a journal line never runs ahead of the bytes on disk;
* a layer (or a flat image) is marked complete once its target was closed cleanly (flushed, and for
  qcow2 checked by ``qemu-img check``): a resumed restore does not even open it again.

Journal lines are appended and fsync'ed one checkpoint at a time (every :data:`CHECKPOINT_BYTES` of
data, so resuming redoes at most that much per writer); a torn last line (killed mid-append) is ignored.
The file lives next to the partial images, private like them (``0600``), and goes with them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .targets import FILE_MODE, create_file

log = logging.getLogger(__name__)

CHECKPOINT_BYTES = 256 << 20  # data written between two checkpoints (one fdatasync + one journal line)
VERSION = 1


class Journal:
    """Append-only record of one disk's restore progress (see the module docstring)."""

    def __init__(self, path: Path, header: dict[str, Any], done: dict[str, set[str]], complete: set[str]) -> None:
        self.path = path
        self.header = header
        self._done = done
        self._complete = complete

    @classmethod
    def start(cls, path: Path, header: dict[str, Any], resume: bool, mode: int = FILE_MODE) -> tuple[Journal, bool]:
        """The journal at *path*: continued when *resume* and it is this restore's, else a new one.
        Returns ``(journal, continued)``."""
        header = {"version": VERSION, **header}
        if resume:
            found = cls._read(path, header)
            if found is not None:
                return found, True
        path.unlink(missing_ok=True)
        fd = create_file(path, mode)
        try:
            os.write(fd, (json.dumps(header, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(path, header, {}, set()), False

    @classmethod
    def _read(cls, path: Path, header: dict[str, Any]) -> Journal | None:
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the resume journal %s (%s): starting this disk over", path, exc.strerror)
            return None
        try:
            first = json.loads(lines[0])
        except ValueError:
            first = None
        if first != header:
            log.warning("%s belongs to another restore (%s): starting this disk over", path,
                        ", ".join(f"{k} {first.get(k)!r}" for k in ("point", "mode", "format")
                                  if isinstance(first, dict) and first.get(k) != header.get(k)) or "unreadable")
            return None
        done: dict[str, set[str]] = {}
        complete: set[str] = set()
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                layer = str(entry["layer"])
            except (ValueError, KeyError, TypeError):
                continue  # the torn tail of a killed append (or an empty last line)
            if entry.get("reset"):
                done.pop(layer, None)
                complete.discard(layer)
                continue
            if entry.get("complete"):
                complete.add(layer)
            done.setdefault(layer, set()).update(str(k) for k in entry.get("done", []))
        return cls(path, header, done, complete)

    def done(self, layer: str) -> set[str]:
        """Range keys of *layer* already durable in its image."""
        return set(self._done.get(layer, ()))

    def complete(self, layer: str) -> bool:
        return layer in self._complete

    def record(self, layer: str, keys: list[str]) -> None:
        """Append *keys* (range reads whose writes are durable already) for *layer*."""
        if keys:
            self._append({"layer": layer, "done": keys})
            self._done.setdefault(layer, set()).update(keys)

    def finish(self, layer: str) -> None:
        """*layer*'s image is complete and closed."""
        self._append({"layer": layer, "complete": True})
        self._complete.add(layer)

    def reset(self, layer: str) -> None:
        """*layer*'s image is made anew (new, missing or unusable): nothing of it counts as written, now
        and in any later resume (a line says so: older lines of the layer then count for nothing)."""
        if layer in self._done or layer in self._complete:
            self._append({"layer": layer, "reset": True})
        self._done.pop(layer, None)
        self._complete.discard(layer)

    def _append(self, entry: dict[str, Any]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            line = (json.dumps(entry, sort_keys=True) + "\n").encode()
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line  # after a torn line (a killed append): never merge with it
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
