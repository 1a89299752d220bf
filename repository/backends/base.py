"""The storage backend contract.

A backend stores immutable, named objects. The repository needs only six operations, each with
documented error semantics so that the layers above can decide between retrying and giving up:

* missing object → :class:`~repository.errors.ObjectNotFound`
* may succeed if retried (timeout, 5xx, throttling, reset) → :class:`~repository.errors.TransientBackendError`
  — a backend raises these at once; the :class:`~.wrappers.Retrying` layer retries them
* will not succeed (denied, no bucket, disk full) → :class:`~repository.errors.PermanentBackendError`
* a wait inside the stack (rate limit, retry pause) cut short by :meth:`Backend.cancel`
  → :class:`~repository.errors.Interrupted`

Object names are ``/``-separated relative paths made of ``[A-Za-z0-9._%-]`` segments. No backend may ever
expose a partially written object under its final name: a reader sees the whole object or nothing.
The conformance suite in ``tests/test_backend_conformance.py`` pins this contract for every backend.

A backend only talks to its storage. Retrying, ``--bwlimit`` and request counting are wrappers around
this interface (``wrappers.py``), composed in one place: :func:`~repository.backends.open_backend`.
Errors carry ``object`` (the name) and, where the storage has them, ``code`` and ``status``: the layers
above decide on those fields, never on message text.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..spill import Spill

_NAME = re.compile(r"^[A-Za-z0-9._%-]+(/[A-Za-z0-9._%-]+)*$")

Data = bytes | bytearray | memoryview | Spill  # a Spill: a pack built in a private file (``spill``)


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    #: when the object was last written (seconds since the epoch), where the listing says (S3, local)
    mtime: float | None = None


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def has_userinfo(url: str) -> bool:
    """Whether *url* carries ``user[:password]@`` before its host (credentials, as far as fleece knows)."""
    return _USERINFO.match(url) is not None


def redact_url(url: str) -> str:
    """*url* with its userinfo (``user:password@``) replaced by ``***@``: safe for any message or log."""
    return _USERINFO.sub(r"\1***@", url, count=1)


def check_name(name: str) -> str:
    """Reject names that could escape the repository or collide with temporary files."""
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")) or ".tmp-" in name:
        raise ValueError(f"invalid object name {name!r}")
    return name


class RangeReader:
    """One byte range of an object, read piece by piece (:meth:`Backend.open_range`): a restore decodes
    each blob of a range as it arrives instead of holding the whole range in memory.

    :meth:`readinto` fills *out* completely unless the range ends first (then it returns fewer bytes; 0
    at its end). This default holds the range read whole by ``get``; backends that can stream override
    :meth:`Backend.open_range`."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def readinto(self, out: memoryview) -> int:
        n = min(len(out), len(self._data) - self._pos)
        out[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._data = memoryview(b"")


class Backend(ABC):
    """Immutable object storage (local directory, S3, ...)."""

    #: Human-readable location, e.g. ``/srv/backups`` or ``s3://bucket/prefix``; never contains secrets.
    location: str = ""
    #: How many operations this backend serves well in parallel (sizes the writer's upload pool).
    parallelism: int = 2

    @abstractmethod
    def put(self, name: str, data: Data) -> None:
        """Store *data* under *name*, replacing an existing object atomically."""

    @abstractmethod
    def put_if_absent(self, name: str, data: Data) -> bool:
        """Store *data* under *name* unless it exists; return False (and change nothing) if it does."""

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read *length* bytes at *offset* (all of the rest when *length* is None).

        Returns fewer bytes only when the object ends first; an *offset* at or past the end gives ``b""``.
        """

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        """*length* bytes at *offset*, to be read in pieces (one request; fewer bytes if the object ends
        first). Errors opening are ``get``'s; a streaming reader raises them from ``readinto`` too. The
        default reads the range whole through :meth:`get`: a wrapper that only overrides ``get`` (a fault
        injector) is therefore in the path."""
        return RangeReader(self.get(name, offset, length))

    @abstractmethod
    def head(self, name: str) -> ObjectInfo:
        """Size of an object (raises :class:`ObjectNotFound` when missing)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with *prefix*, in no particular order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an object; removing a missing object is not an error."""

    def delete_many(self, names: Sequence[str]) -> None:
        """Remove objects (missing ones are not an error), as few requests as the storage allows.

        Prune deletes thousands of packs: S3 takes 1000 names per ``DeleteObjects`` request. The default
        deletes one by one. A failure raises; names before it may be gone, names after it are not.
        """
        for name in names:
            self.delete(name)

    #: S3 Object Lock for new objects: ``(mode, days)`` once the repository's config asks for it
    object_lock: tuple[str, int] | None = None

    def set_object_lock(self, mode: str, days: int) -> None:
        """Lock every object written from now on (``data/``, ``index/``, ``points/``, ``config``) for *days*
        in *mode* (S3 Object Lock: ``GOVERNANCE`` or ``COMPLIANCE``). Storages without it refuse."""
        from ..errors import UsageError

        raise UsageError(f"{self.location} cannot lock objects (S3 Object Lock): a repository made with "
                         "'fleece init --object-lock' lives in an S3 bucket with Object Lock enabled")

    def extend_lock(self, name: str, until: float) -> None:
        """Keep *name* locked until *until* (seconds since the epoch) at least."""
        self.set_object_lock("GOVERNANCE", 0)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default does nothing."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Wake the operations waiting inside this backend now; each raises
        :class:`~repository.errors.Interrupted`. Thread-safe; the default does nothing.

        For unwinding a run (Ctrl-C, SIGTERM, a failed stage): the main thread waits for the upload
        workers, and a worker must not sit out a ``--bwlimit`` pause or a retry back-off first. Only
        *waits* are cut short — a request already on the wire ends by itself (its timeouts bound it).
        Operations started after the call work normally: the run's clean-up uses the same backend.
        """

    def discard_location(self) -> None:  # noqa: B027 - optional hook
        """Remove what opening with ``create`` made (e.g. a directory), if it is empty again.

        For a new repository whose first backup failed: the user's ``--repo`` must not appear because of
        a run that stored nothing. Object stores have nothing to remove (a prefix is no place).
        """

    def exists(self, name: str) -> bool:
        from ..errors import ObjectNotFound

        try:
            self.head(name)
        except ObjectNotFound:
            return False
        return True
