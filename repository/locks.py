"""The maintenance lock: forget, prune, rebuild-index and protect run one at a time per repository.

Backups never lock (DESIGN §4): they race with maintenance by the rules of ``repository.gc``. Two
maintenance commands, though, would undo each other — two prunes condemning and consolidating the same
index objects, a forget merging a point another forget is deleting — so they take ``locks/maintenance``
with put-if-absent, the one atomic primitive every backend has.

A lock holds who took it (host, pid, purpose), when, and until when it is valid: the holder refreshes
it every :data:`REFRESH` seconds, and a lock not refreshed for :data:`STALE` seconds is stale (its
holder was killed or lost the network) and is taken over. A lock of a process on *this* host that no
longer exists is stale at once, so a killed prune does not block the next one for minutes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from types import TracebackType

from .backends import Backend
from .envelope import Envelope
from .errors import IntegrityError, LockedError, ObjectNotFound

log = logging.getLogger(__name__)

LOCK_NAME = "locks/maintenance"
REFRESH = 60.0
STALE = 300.0


class MaintenanceLock:
    """``with MaintenanceLock(backend, envelope, "prune"):`` — exclusive, refreshed, stale-aware."""

    def __init__(self, backend: Backend, envelope: Envelope, purpose: str, *, now=time.time) -> None:
        self.backend = backend
        self.envelope = envelope
        self.purpose = purpose
        self._now = now
        self._nonce = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        #: the lock was taken over by another run: stop before deleting anything
        self.lost = False

    def _doc(self) -> dict[str, object]:
        now = self._now()
        return {"purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(), "nonce": self._nonce,
                "created": getattr(self, "_created", now), "refreshed": now, "expires": now + STALE}

    def acquire(self) -> None:
        self._created = self._now()
        for _ in range(3):
            if self.backend.put_if_absent(LOCK_NAME, self.envelope.seal_record(LOCK_NAME, self._doc())):
                self._held = True
                self._thread = threading.Thread(target=self._refresh, name="fleece-lock", daemon=True)
                self._thread.start()
                return
            holder = self._holder()
            if holder is None:
                continue  # released (or unreadable and removed) meanwhile: try again
            doc, why = holder
            who = f"{doc.get('purpose')} on {doc.get('host')} pid {doc.get('pid')} since {_stamp(doc.get('created'))}"
            if why:
                again = self._holder()  # the same stale lock still (not one a racing taker just put)?
                if again is not None and again[0].get("nonce") == doc.get("nonce") and again[1]:
                    log.warning("taking over the maintenance lock of %s: %s", who, why)
                    self.backend.delete(LOCK_NAME)
                continue
            raise LockedError(f"{self.backend.location} is locked for maintenance by {who}: wait for it to finish "
                              f"(a lock its holder stops refreshing is taken over after {int(STALE)} s)",
                              holder=who, object=LOCK_NAME)
        raise LockedError(f"could not take the maintenance lock of {self.backend.location}: it changes hands "
                          "constantly; try again", holder="unknown", object=LOCK_NAME)

    def _holder(self) -> tuple[dict[str, object], str] | None:
        """The current lock and why it is stale (``""`` when it is live); ``None`` when there is none."""
        try:
            stored = self.backend.get(LOCK_NAME)
        except ObjectNotFound:
            return None
        try:
            doc = self.envelope.open_record(LOCK_NAME, stored)
        except IntegrityError:
            return {"purpose": "?", "host": "?", "pid": "?", "created": None}, "it is unreadable"
        expires = doc.get("expires")
        if not isinstance(expires, (int, float)) or expires < self._now():
            return doc, "it has not been refreshed in time (its holder died)"
        if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int) and not _alive(doc["pid"]):
            return doc, f"process {doc['pid']} of this host is gone"
        return doc, ""

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                holder = self._holder()
                if holder is None or holder[0].get("nonce") != self._nonce:
                    # taken over (this process stalled past STALE): never write over the new holder's lock
                    self.lost = True
                    log.error("the maintenance lock was taken over by another run; %s stops before it deletes "
                              "anything more", self.purpose)
                    return
                self.backend.put(LOCK_NAME, self.envelope.seal_record(LOCK_NAME, self._doc()))
            except Exception as exc:  # noqa: BLE001 - the next refresh may work; STALE leaves room for four misses
                log.warning("could not refresh the maintenance lock: %s", exc)

    def check(self) -> None:
        """Raise :class:`LockedError` if the lock was lost (taken over by another run): call before
        deleting anything."""
        holder = self._holder() if not self.lost else None
        if self.lost or holder is None or holder[0].get("nonce") != self._nonce:
            self.lost = True
            raise LockedError(f"the maintenance lock of {self.backend.location} was taken over by another run "
                              f"while this {self.purpose} ran (it stalled longer than {int(STALE)} s): it stopped "
                              "before deleting anything more; run it again", holder="another run",
                              object=LOCK_NAME)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder is not None and holder[0].get("nonce") == self._nonce:
            self.backend.delete(LOCK_NAME)

    def __enter__(self) -> MaintenanceLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stamp(t: object) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
