"""Condemnation records: how prune deletes packs while backups keep writing, without a lock.

A pack no manifest needs is not deleted when prune finds it: prune *condemns* it, in a record
``condemned/<time>-<random>`` that says when and with which grace, and deletes it only in a later phase,
once the grace has passed, if the manifests it lists *then* still do not need it. A backup, for its part:

* loads the records before the index and never deduplicates against a condemned pack (it stores such a
  blob again: :attr:`CommitGuard.excluded`);
* right before its manifest (the commit point) lists the records again and refuses to commit
  (:class:`~.errors.PruneConflict`) when a pack its point needs is condemned and its grace is (nearly)
  over, or is already deleted — the run outlived the grace. Otherwise its manifest lands before the
  grace ends, and the deleting phase, which lists the manifests only after the grace, sees it and
  rescues the pack;
* after a very long run (:data:`LONG_RUN`) also checks with HEAD requests that every pack it needs still
  exists: records of deletions are kept for a day after the deletion (:data:`KEEP_DONE`), so only a run
  longer than that could miss one.

The full set of rules, for writers and readers, is in docs/FORMAT.md ("garbage collection").
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .backends import Backend
from .envelope import Envelope
from .errors import IntegrityError, ObjectNotFound, PruneConflict
from .pack import pack_name
from .workers import map_all

PREFIX = "condemned/"
PENDING = "pending"
DONE = "done"
#: a run longer than this HEADs the packs it needs before committing (see the module docstring)
LONG_RUN = 12 * 3600.0
#: how long the record of a deletion stays after it (at least; longer when the grace is longer)
KEEP_DONE = 24 * 3600.0
#: a record is a list of pack ids; a bigger object is damage
MAX_RECORD = 64 << 20


def skew(grace: float) -> float:
    """Clock skew and commit latency allowed between a backup's host and prune's: a backup commits only
    while at least this much of a condemned pack's grace is left."""
    return min(300.0, grace / 4)


@dataclass
class Condemnation:
    """One prune's condemned packs, then (``done``) which of them it deleted and which it rescued."""

    name: str
    created: float
    grace: float
    packs: list[str]
    state: str = PENDING
    deleted: list[str] = field(default_factory=list)
    rescued: list[str] = field(default_factory=list)
    done_at: float | None = None
    host: str = ""

    @property
    def deadline(self) -> float:
        """From this moment on the packs may be deleted."""
        return self.created + self.grace

    def due(self, now: float) -> bool:
        return self.state == PENDING and now >= self.deadline

    def expired(self, now: float) -> bool:
        """A done record no backup can still need (see :data:`KEEP_DONE`)."""
        return self.state == DONE and self.done_at is not None and now >= self.done_at + max(KEEP_DONE, self.grace)

    def to_doc(self) -> dict[str, object]:
        return {"created": self.created, "grace": self.grace, "packs": self.packs, "state": self.state,
                "deleted": self.deleted, "rescued": self.rescued, "done_at": self.done_at, "host": self.host}

    @classmethod
    def from_doc(cls, name: str, doc: dict[str, object]) -> Condemnation:
        try:
            rec = cls(name, float(doc["created"]), float(doc["grace"]), [str(p) for p in doc["packs"]],  # type: ignore[arg-type,union-attr]
                      str(doc["state"]), [str(p) for p in doc.get("deleted") or []],  # type: ignore[union-attr]
                      [str(p) for p in doc.get("rescued") or []],  # type: ignore[union-attr]
                      None if doc.get("done_at") is None else float(doc["done_at"]),  # type: ignore[arg-type]
                      str(doc.get("host", "")))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{name} is not a condemnation record: remove it", object=name) from None
        if rec.state not in (PENDING, DONE) or rec.grace < 0:
            raise IntegrityError(f"{name} is not a condemnation record: remove it", object=name)
        return rec


def new_record(packs: Iterable[str], grace: float, host: str, now: float) -> Condemnation:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return Condemnation(f"{PREFIX}{stamp}-{secrets.token_hex(4)}", now, grace, sorted(packs), host=host)


def read_records(backend: Backend, envelope: Envelope, cache: dict[str, Condemnation] | None = None
                 ) -> list[Condemnation]:
    """Every record, oldest first. A record that cannot be read is an error naming it: it could
    condemn a pack this caller relies on. Pending records are re-read (prune rewrites them when done)."""
    out = []
    for info in sorted(backend.list(PREFIX), key=lambda i: i.name):
        known = cache.get(info.name) if cache is not None else None
        if known is not None and known.state == DONE:
            out.append(known)
            continue
        if info.size > MAX_RECORD:
            raise IntegrityError(f"{info.name} is {info.size} bytes, too big for a condemnation record: remove it",
                                 object=info.name)
        try:
            stored = backend.get(info.name)
        except ObjectNotFound:
            continue  # expired and removed while listed
        rec = Condemnation.from_doc(info.name, envelope.open_record(info.name, stored))
        if cache is not None:
            cache[info.name] = rec
        out.append(rec)
    return out


def write_record(backend: Backend, envelope: Envelope, rec: Condemnation) -> None:
    backend.put(rec.name, envelope.seal_record(rec.name, rec.to_doc()))


def pending_packs(records: Iterable[Condemnation]) -> set[str]:
    return {p for r in records if r.state == PENDING for p in r.packs}


class CommitGuard:
    """A backup's side of the protocol, from the moment it loads the index to its commit."""

    def __init__(self, backend: Backend, envelope: Envelope, *, now: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.envelope = envelope
        self._now = now
        self._cache: dict[str, Condemnation] = {}
        #: when the index this run deduplicates against was loaded (records were read just before it)
        self.loaded_at = now()
        #: packs condemned when the index was loaded: never deduplicated against
        self.excluded = pending_packs(read_records(backend, envelope, self._cache))

    def check(self, packs: set[str], workers: int = 8) -> None:
        """Raise :class:`PruneConflict` unless every pack in *packs* (those the point to be committed
        needs) will survive until prune can see the point. Call right before the manifest is written."""
        now = self._now()
        for rec in read_records(self.backend, self.envelope, self._cache):
            hit = packs & (set(rec.deleted) if rec.state == DONE else set(rec.packs))
            if not hit:
                continue
            pack = pack_name(sorted(hit)[0])
            if rec.state == DONE:
                raise PruneConflict(f"not committed: pack {pack}, which this point needs, was deleted by the prune "
                                    f"of {rec.name} while this backup ran (its grace was {rec.grace:.0f} s); run the "
                                    "backup again — the VM's bitmap still holds every change", object=pack)
            if now >= rec.deadline - skew(rec.grace):
                raise PruneConflict(f"not committed: pack {pack}, which this point needs, was condemned by a prune "
                                    f"({rec.name}) and may be deleted from {_stamp(rec.deadline)} on: this backup "
                                    f"ran longer than the prune's grace ({rec.grace:.0f} s); run it again — the VM's "
                                    "bitmap still holds every change", object=pack)
        if now - self.loaded_at >= LONG_RUN:
            def missing(pack: str) -> str | None:
                try:
                    self.backend.head(pack_name(pack))
                except ObjectNotFound:
                    return pack
                return None

            gone = [p for p in map_all(missing, sorted(packs), workers=workers, name="fleece-gc-check",
                                       on_close=self.backend.cancel) if p]
            if gone:
                raise PruneConflict(f"not committed: pack {pack_name(gone[0])}, which this point needs, is gone "
                                    f"(deleted by a prune during this {int((now - self.loaded_at) / 3600)} h run); run "
                                    "the backup again — the VM's bitmap still holds every change",
                                    object=pack_name(gone[0]))


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
