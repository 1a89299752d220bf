"""The repository: one object the exporter writes points into and restore reads them back from.

Write ordering (the invariant that makes backups lock-free and crash-safe):
packs durable → index durable → manifest written with put-if-absent (the commit point). Readers trust
only points whose manifest exists; packs or indexes of runs that never committed are garbage.

Format 1 is plaintext; format 2 is encrypted (``crypto``, ``envelope``): opening it unlocks one of its
``keys/`` slots before anything else is read, so a wrong key fails before any work.
"""

from __future__ import annotations

import logging
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .backends import Backend, Counting, ObjectInfo, open_backend
from .backends import layer as backend_layer
from .chain import Piece, resolve
from .codec import CodecPool
from .config import CONFIG_NAME, RepoConfig
from .credentials import PAPER, Credential, from_environment, kdf_seconds
from .crypto import FULL, KeySlot, Keys, MasterKey, import_paper, new_slot, tune_scrypt, unlock
from . import pins
from .envelope import MANIFEST_MAGIC, Envelope
from .gc import CommitGuard
from .locks import MaintenanceLock
from .merge import layer_copy
from .errors import FormatMismatch, IntegrityError, KeyAccessError, ObjectNotFound, RepositoryError, UsageError, WrongKeyError
from .index import Index, Location, decode_index, encode_index, find_entries
from .manifest import KIND_FULL, Manifest
from .pack import PackEntry, is_pack_id, pack_name
from .workers import map_all
from .writer import BlobWriter, Committed

log = logging.getLogger(__name__)

KEYS_PREFIX = "keys/"
_TOKEN = re.compile(r"[0-9a-f]{32}")  # a format 2 VM directory (Keys.name_token)

#: what opens an encrypted repository: a credential, a function asked only when one is needed (the CLI's
#: prompt; its argument says whether the repository is being created, so a prompt can ask twice), or
#: ``None`` for the environment (``credentials.from_environment``)
CredentialSource = Credential | Callable[[bool], Credential | None] | None

NO_CREDENTIAL = ("set FLEECE_PASSWORD, FLEECE_PASSWORD_FILE, FLEECE_PASSWORD_COMMAND or FLEECE_KEY_FILE "
                 "(or run on a terminal to be asked)")


@dataclass
class ReadRange:
    """One ranged read of a pack and the blobs it covers."""

    pack: str
    start: int
    end: int
    items: list[tuple[bytes, Location]]


@dataclass
class RebuildReport:
    """What :meth:`Repository.rebuild_index` did and every piece of damage it found on the way."""

    index: str = ""  #: name of the index object written
    packs: int = 0  #: intact packs indexed from their own tables
    blobs: int = 0  #: blobs in those packs
    #: pack name → why its own table could not be read (these packs are not indexed from their tables)
    damaged: dict[str, str] = field(default_factory=dict)
    #: damaged pack name → how many of its blob entries were kept from the old index (its payloads may
    #: still be intact: reads verify every blob, and ``verify --read-data`` tells)
    kept: dict[str, int] = field(default_factory=dict)
    #: packs the old index names that do not exist
    missing: list[str] = field(default_factory=list)
    #: old index objects that could not be read (superseded by the new one)
    replaced: dict[str, str] = field(default_factory=dict)
    #: ``vm/point`` → what the point lacks: blobs that only damaged or missing packs held
    points: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.points)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "index": self.index, "packs": self.packs, "blobs": self.blobs,
                "damaged_packs": self.damaged, "kept_from_old_index": self.kept, "missing_packs": self.missing,
                "replaced_index_objects": self.replaced, "damaged_points": self.points}


@dataclass
class PointScan:
    """Every readable manifest of a VM (oldest first) and the ones that could not be read."""

    points: list[Manifest]
    damaged: dict[str, str]


class Repository:
    """Open with :meth:`open`; all methods are safe to call from several threads except :meth:`writer`'s
    returned object, which has its own rules."""

    def __init__(self, backend: Backend, config: RepoConfig, url: str = "", keys: Keys | None = None,
                 slot: KeySlot | None = None) -> None:
        if (config.format == 2) != (keys is not None):
            raise ValueError("format 2 repositories need their keys, format 1 ones none")
        self.backend = backend
        self.config = config
        self.url = url or backend.location
        self.envelope = Envelope(keys)
        #: the key slot that opened this repository (format 2)
        self.slot = slot
        #: this handle wrote the config: the repository is new (see :meth:`discard_if_new`)
        self.created = False
        self._index: Index | None = None
        #: prune's records as of the index load (``repository.gc``); ``None`` until the index is loaded
        self.guard: CommitGuard | None = None
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._vm_names: dict[str, str] = {}  # format 2: points/<token>/ → VM name, learnt from manifests
        self._codecs = CodecPool(config.compression.get("level", 3), self.envelope.blob_id)

    @property
    def keys(self) -> Keys | None:
        return self.envelope.keys

    @property
    def encrypted(self) -> bool:
        return self.envelope.encrypted

    # -- opening ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = False, config: RepoConfig | None = None,
             credential: CredentialSource = None, kdf_time: float | None = None,
             bwlimit: int | None = None, attempts: int | None = None, **backend_options: object) -> Repository:
        """Open the repository at *url*; with *create*, make it (and its ``config``) if it does not exist.

        The backend comes wrapped (:func:`~.backends.open_backend`): transient failures retried up to
        *attempts* times, bytes sent capped at *bwlimit* bytes per second, requests counted
        (:meth:`requests`). *backend_options* are the storage's own (S3: ``endpoint``, ``workers``,
        ``create_bucket``).

        An encrypted repository (format 2) is unlocked here with *credential* (see
        :data:`CredentialSource`): a wrong or missing key fails before anything else is read. A new one
        (*config* of format 2) gets a random master key and a first full key slot from *credential*,
        its scrypt tuned to *kdf_time* seconds (default ``FLEECE_KDF_TIME`` or 0.5 s).
        """
        lock = create and config is not None and config.object_lock is not None
        backend = open_backend(url, create=create, bwlimit=bwlimit, attempts=attempts, object_lock=lock,
                               **backend_options)
        try:
            try:
                data = backend.get(CONFIG_NAME)
            except ObjectNotFound:
                if not create:
                    raise RepositoryError(f"no fleece repository at {backend.location} (no 'config' object): "
                                          f"check --repo, or create one with 'fleece init --repo {url}'") from None
                made = cls._create(backend, url, config or RepoConfig(), credential, kdf_time)
                if made is not None:
                    return made
                data = backend.get(CONFIG_NAME)  # someone else created it first: use theirs
            return cls._unlock(backend, url, RepoConfig.from_bytes(data, backend.location), credential)
        except BaseException:
            backend.close()
            if create:
                backend.discard_location()  # e.g. a damaged config: no new directory either
            raise

    @classmethod
    def _create(cls, backend: Backend, url: str, fresh: RepoConfig, credential: CredentialSource,
                kdf_time: float | None) -> Repository | None:
        """Make a new repository; ``None`` if another writer's config won the put-if-absent race.

        Format 2 writes its first key slot *before* the config: a config is never visible without a
        slot that opens it (a crash in between leaves a stray slot, which nothing trusts).
        """
        fresh.validate(backend.location)
        if fresh.object_lock is not None:
            _lockable(backend)
            backend.set_object_lock(fresh.object_lock["mode"], fresh.object_lock["days"])
        keys: MasterKey | None = None
        slot: KeySlot | None = None
        if fresh.format == 2:
            given = _credential(credential, new=True)
            if given is None:
                raise UsageError(f"a new repository at {backend.location} is encrypted: {NO_CREDENTIAL}, or create "
                                 f"it unencrypted with 'fleece init --no-encryption --repo {url}'")
            keys = MasterKey.generate()
            fresh = replace(fresh, auth=keys.mac("config", fresh.canonical()))
            slot = _make_slot(keys, given, fresh.id, FULL, kdf_time, "created with the repository")
            backend.put(f"{KEYS_PREFIX}{slot.id}", _slot_bytes(slot))
        if not backend.put_if_absent(CONFIG_NAME, fresh.to_bytes()):
            if slot is not None:
                backend.delete(f"{KEYS_PREFIX}{slot.id}")
            return None
        repo = cls(backend, RepoConfig.from_bytes(fresh.to_bytes(), backend.location), url, keys, slot)
        repo.created = True
        return repo

    @classmethod
    def _unlock(cls, backend: Backend, url: str, config: RepoConfig, credential: CredentialSource) -> Repository:
        if config.object_lock is not None:
            backend.set_object_lock(config.object_lock["mode"], config.object_lock["days"])
        if config.format == 1:
            if any(True for _ in backend.list(KEYS_PREFIX)):
                raise IntegrityError(f"{backend.location} holds key slots (keys/) but its config says it is not "
                                     "encrypted: the config was replaced, perhaps to make backups store plaintext; "
                                     "put back the original config", object=CONFIG_NAME)
            return cls(backend, config, url)
        slots = read_slots(backend)
        given = _credential(credential, new=False)
        if given is None:
            raise WrongKeyError(f"{backend.location} is encrypted: {NO_CREDENTIAL}", object=backend.location)
        if given.kind == PAPER:  # the recovery export: the master secret itself, checked against the config
            keys, slot = import_paper(given.secret.decode(errors="replace")), None
            if keys.mac("config", config.canonical()) != config.auth:
                raise WrongKeyError(f"the paper key ({given.source}) is not the key of {backend.location}",
                                    object=backend.location)
            return cls(backend, config, url, keys, slot)

        def genuine(keys: Keys, slot: KeySlot) -> bool:
            if keys.mac("config", config.canonical()) != config.auth:
                return False  # a slot planted for a guessed password, or a copy from another repository
            if not keys.can_read and not pins.matches(config.id, keys.public):
                log.error("key slot %s opens with this write-only key but names another repository public key "
                          "than the one this host pinned (%s): someone who holds a copy of the key planted it to "
                          "read this host's backups; remove keys/%s", slot.id, pins.state_dir(), slot.id)
                return False
            return True

        keys, slot = unlock(slots, given.secret, backend.location, given.kind, given.source, repo=config.id,
                            accept=genuine)
        if not keys.can_read:
            pins.pin(config.id, keys.public)
        return cls(backend, config, url, keys, slot)

    def discard_if_new(self) -> bool:
        """Take back a repository this open created, after the run that needed it failed.

        Only when this handle wrote the ``config`` and no point was committed since: then the objects
        this handle stored (orphan packs and indexes of the failed run, the config) are deleted, and
        what opening made (a directory) goes if it is empty. Objects someone else stored meanwhile are
        left alone, and so is the config then. Returns whether the repository is gone.
        """
        if not self.created:
            return False
        if any(True for _ in self.backend.list("points/")):
            return False
        counting = backend_layer(self.backend, Counting)
        mine = counting.written() if counting is not None else {CONFIG_NAME}
        for name in sorted(mine - {CONFIG_NAME}):
            self.backend.delete(name)
        if any(info.name != CONFIG_NAME for info in self.backend.list()):
            return False  # another run is filling it: the repository stays
        self.backend.delete(CONFIG_NAME)
        self.backend.discard_location()
        self.created = False
        return True

    def close(self) -> None:
        self.backend.close()

    def traffic(self) -> dict[str, Any]:
        """What was asked of the storage so far (:meth:`.backends.Counting.snapshot`); ``{}`` for a
        repository made around a backend without a counting layer."""
        counting = backend_layer(self.backend, Counting)
        return counting.snapshot() if counting is not None else {}

    def requests(self) -> dict[str, int]:
        """Requests sent to the storage so far, by verb (``PUT``, ``GET``, ``HEAD``, ``LIST``, ``DELETE``)."""
        return dict(self.traffic().get("requests", {}))

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------------------------------

    def key_slots(self) -> list[KeySlot]:
        """Every readable key slot (format 2; ``[]`` for an unencrypted repository)."""
        return read_slots(self.backend) if self.encrypted else []

    def add_key(self, credential: Credential, *, access: str = FULL, label: str = "",
                kdf_time: float | None = None) -> KeySlot:
        """A new key slot opening this repository with *credential*: full, or write-only (backups only).

        Only ``keys/`` is touched: no data is re-encrypted. A write-only key may add write-only slots only.
        """
        keys = self._require_keys()
        slot = _make_slot(keys, credential, self.config.id, access, kdf_time, label)
        if not self.backend.put_if_absent(f"{KEYS_PREFIX}{slot.id}", _slot_bytes(slot)):
            raise RepositoryError(f"key slot {slot.id} already exists (a one in 4 billion collision): run again")
        return slot

    def remove_key(self, slot_id: str, *, current: bool = False) -> KeySlot:
        """Delete one key slot. The last full-access slot is refused: without it nobody could restore.

        The slot this handle was unlocked with is refused too unless *current* (``key passwd``, which
        has just added its replacement): removing the password one is typing is rarely what was meant.
        A write-only key may remove only write-only slots (it could not add back what it removes). Two
        removals racing for the last two full slots: each checks again after deleting and puts its slot
        back if no full slot is left.
        """
        keys = self._require_keys()
        slots = self.key_slots()
        matches = [s for s in slots if s.id == slot_id] or [s for s in slots if s.id.startswith(slot_id)]
        if not slot_id or len(matches) != 1:
            shown = ", ".join(s.id for s in slots)
            raise UsageError(f"no single key slot {slot_id!r} in {self.url} (its slots: {shown}): 'fleece key list' "
                             "shows them")
        (slot,) = matches
        if slot.access == FULL and not keys.can_read:
            raise KeyAccessError(f"a write-only key cannot remove full key slot {slot.id}: use a full key")
        if self.slot is not None and slot.id == self.slot.id and not current:
            raise UsageError(f"key slot {slot.id} is the one this command was unlocked with: replace it with "
                             "'fleece key passwd', or unlock with another key to remove it")
        last = (f"key slot {slot.id} is the last full-access key of {self.url}: without it nothing could be "
                "restored; add another ('fleece key add') before removing it")
        if slot.access == FULL and sum(s.access == FULL for s in slots) == 1:
            raise UsageError(last)
        self.backend.delete(f"{KEYS_PREFIX}{slot.id}")
        if slot.access == FULL and not any(s.access == FULL for s in self.key_slots()):
            self.backend.put(f"{KEYS_PREFIX}{slot.id}", _slot_bytes(slot))  # a concurrent removal took the other
            raise UsageError(last)
        return slot

    def check_not_downgraded(self) -> None:
        """Before writing into a plaintext repository: refuse one that shows it was encrypted.

        Opening already refuses a format 1 config next to key slots, and the index loads refuse encrypted
        index objects; someone who deleted ``keys/`` and ``index/`` as well still leaves the sealed
        manifests under ``points/<32 hex token>/``. One listing of ``points/`` and, per token-like
        directory (normally none), the first bytes of one manifest: a :class:`FormatMismatch` before the
        backup touches QEMU, instead of a plaintext backup into what was an encrypted repository.
        """
        if self.encrypted:
            return
        seen: set[str] = set()
        for info in self.backend.list("points/"):
            parts = info.name.split("/")
            if len(parts) != 3 or parts[1] in seen or not _TOKEN.fullmatch(parts[1]):
                continue
            seen.add(parts[1])
            try:
                head = self.backend.get(info.name, 0, len(MANIFEST_MAGIC))
            except ObjectNotFound:
                continue
            if head == MANIFEST_MAGIC:
                raise FormatMismatch(f"{info.name} is an encrypted manifest but the config says {self.url} is "
                                     "unencrypted: the config was replaced (and its key slots deleted); fleece "
                                     "will not store plaintext into an encrypted repository — put back the "
                                     "original config and keys/", object=info.name)

    def _require_keys(self) -> Keys:
        if self.keys is None:
            raise UsageError(f"{self.url} is not encrypted (format 1): it has no keys to manage")
        return self.keys

    # -- index ------------------------------------------------------------------------------------------

    def load_index(self, refresh: bool = False) -> Index:
        """Merge every ``index/*`` object (cached). A damaged index object is an error, never skipped.

        Prune's records are read first (:class:`~.gc.CommitGuard`): a backup never deduplicates against
        a pack condemned before its index was loaded, and :meth:`commit` checks the others.
        """
        if self._index is not None and not refresh:
            return self._index
        self.guard = CommitGuard(self.backend, self.envelope)
        index, damaged = self.load_index_report()
        if damaged:
            raise IntegrityError(f"{next(iter(damaged.values()))} (to repair it: fleece rebuild-index --repo "
                                 f"{self.url})", object=next(iter(damaged)))
        self._index = index
        return index

    def load_index_report(self, keep_tables: bool = False) -> tuple[Index, dict[str, IntegrityError]]:
        """Every readable index object merged, plus the damaged ones (for ``verify``).

        With *keep_tables* the index also keeps each pack's table as the index objects give it
        (:attr:`Index.tables`), so that it can be compared with the pack's own.
        """
        return self._read_indexes([info.name for info in self.backend.list("index/")], keep_tables)

    def _read_indexes(self, names: Iterable[str], keep_tables: bool) -> tuple[Index, dict[str, IntegrityError]]:
        index = Index(keep_tables)
        index.condemned = set(self.guard.excluded) if self.guard is not None else set()
        damaged: dict[str, IntegrityError] = {}
        todo, done, vanished = list(names), set(), False
        while todo:
            name = todo.pop(0)
            done.add(name)
            try:
                for pack_id, entries, header in decode_index(name.split("/", 1)[1], self.backend.get(name),
                                                             self.envelope.meta):
                    index.add_pack(pack_id, entries, name, header)
            except ObjectNotFound:
                # a prune consolidated it after the listing: its replacement was written before it went,
                # so one more listing finds it (once: a second vanishing is a second prune, also fine)
                if not vanished:
                    vanished = True
                    todo.extend(info.name for info in self.backend.list("index/")
                                if info.name not in done and info.name not in todo)
            except FormatMismatch:
                raise  # not damage: the config was replaced (verify, rebuild-index and backups stop here)
            except IntegrityError as exc:
                damaged[name] = exc
        return index, damaged

    def pack_trailer(self, pack_id: str, size: int | None = None,
                     count_hint: int | None = None) -> tuple[list[PackEntry], bytes]:
        """Read a pack's own blob table and header (its sealed key in format 2, else empty), checked
        against the pack's name (its id is the trailer's hash).

        One range read when *count_hint* (the number of blobs the index says the pack holds) is right,
        two otherwise; *size* saves a ``head`` when a listing already gave it. Every failure is an
        :class:`IntegrityError` naming the pack (a missing pack too); only backend trouble passes through.
        """
        name = pack_name(pack_id)
        layout = self.envelope.packs
        if not is_pack_id(pack_id):
            raise IntegrityError(f"pack {name} is not named like a pack (64 lowercase hex digits)", object=name)
        try:
            if size is None:
                size = self.backend.head(name).size
            if size < layout.footer_size:
                raise IntegrityError(f"pack {name} is truncated ({size} bytes)", object=name)
            want = min(size, layout.span(count_hint)) if count_hint else layout.footer_size
            tail = self.backend.get(name, size - want, want)
            count = layout.count(tail[-layout.footer_size:], size, name)
            if layout.span(count) > len(tail):
                tail = self.backend.get(name, size - layout.span(count), layout.span(count))
        except ObjectNotFound:
            raise IntegrityError(f"pack {name} is missing from {self.url}", object=name) from None
        return layout.verify(pack_id, tail, size, name)

    def rebuild_index(self, workers: int | None = None) -> RebuildReport:
        """Regenerate the index from the packs' own tables, salvaging everything that is intact.

        Every pack whose table reads back and matches its name is indexed; a damaged pack is reported
        by name, never a reason to stop (one bad pack must not make the intact points unrestorable).
        If the old index still describes a damaged pack, those entries are kept (reads verify every blob,
        so a wrong entry can cause a read error, never wrong data). The report also says which points
        need blobs that only damaged or missing packs held.

        Read ordering (see ``repository.check``): manifests are listed first, then the index objects,
        then the packs; only the index objects listed here are deleted, and only after the new one is
        written, so an index written meanwhile by a concurrent backup survives and a crash in between
        leaves redundant (harmless) index entries, never none. Backend errors other than a missing
        object abort the rebuild before anything is written or deleted.
        """
        report = RebuildReport()
        points = [m for vm in self.vms() for m in self.scan(vm).points]
        old_names = [info.name for info in self.backend.list("index/")]
        old, unreadable = self._read_indexes(old_names, keep_tables=True)
        report.replaced = {name: str(exc) for name, exc in unreadable.items()}
        listed = list(self.backend.list("data/"))

        def table(info: ObjectInfo) -> tuple[str, list[PackEntry] | None, str, bytes]:
            pack_id = info.name.rsplit("/", 1)[1]
            if info.name != pack_name(pack_id):
                return pack_id, None, f"{info.name} is not a pack: packs are named data/<2 hex>/<64 hex>", b""
            try:
                entries, header = self.pack_trailer(pack_id, info.size)
                return pack_id, entries, "", header
            except FormatMismatch:
                raise  # stops the rebuild before anything is written or deleted
            except IntegrityError as exc:
                return pack_id, None, str(exc), b""

        results = map_all(table, listed, workers=max(1, workers or self.backend.parallelism), name="fleece-rebuild",
                          on_close=self.backend.cancel)
        intact: list[tuple[str, list[PackEntry], bytes]] = []
        carried: list[tuple[str, list[PackEntry], bytes]] = []
        old_tables = old.tables or {}
        for info, (pack_id, entries, why, header) in zip(listed, results):
            if entries is not None:
                intact.append((pack_id, entries, header))
                continue
            report.damaged[info.name] = why
            variants = old_tables.get(pack_id)
            if variants and info.name == pack_name(pack_id):
                kept = list(max(variants, key=lambda v: len(variants[v])))  # the one most index objects give
                carried.append((pack_id, kept, old.headers.get(pack_id, b"")))
                report.kept[info.name] = len(kept)
        present = {info.name for info in listed}
        report.missing = sorted(pack_name(p) for p in old_tables if pack_name(p) not in present)

        intact.sort(key=lambda item: item[0])
        index_id, data = encode_index(intact + carried, self.envelope.meta)  # intact packs first: they win lookups
        report.index = f"index/{index_id}"
        self.backend.put(report.index, data)
        for name in old_names:
            if name != report.index:
                self.backend.delete(name)
        self._index = None
        report.packs, report.blobs = len(intact), sum(len(e) for _, e, _ in intact)
        report.points = self._lacking(points, {e.id for _, entries, _ in intact for e in entries}, old, report)
        return report

    def _lacking(self, points: list[Manifest], held: set[bytes], old: Index,
                 report: RebuildReport) -> dict[str, list[str]]:
        """For :meth:`rebuild_index`: which points need blobs no intact pack holds, and where they were."""
        lacking: dict[str, list[str]] = {}
        for m in points:
            causes: dict[str, int] = {}
            for blob in dict.fromkeys(b for rec in m.disks.values() for _, _, b in rec.extents if b is not None):
                if blob in held:
                    continue
                loc = old.lookup(blob)
                name = pack_name(loc.pack) if loc is not None else ""
                if loc is None and report.damaged:
                    cause = f"that no intact pack holds (lost with damaged pack(s) {', '.join(sorted(report.damaged))})"
                elif loc is None:
                    cause = "that no pack holds (a pack is missing)"
                elif name in report.kept:
                    cause = (f"held only by damaged pack {name} (its old index entries were kept: readable only "
                             "if its data is intact, run 'fleece verify --read-data')")
                elif name in report.damaged:
                    cause = f"held only by damaged pack {name}"
                elif name in report.missing:
                    cause = f"held only by pack {name}, which is missing"
                else:
                    cause = f"that the old index placed in pack {name}, whose own table does not list them"
                causes[cause] = causes.get(cause, 0) + 1
            if causes:
                lacking[f"{m.vm}/{m.id}"] = [f"needs {n} blob(s) {cause}" for cause, n in causes.items()]
        for m in points:  # restoring a point reads the layers of every disk of its view: see point_view
            try:
                view: dict[str, Manifest] = self.point_view(m)
            except IntegrityError:
                view = dict.fromkeys(m.disks, m)
            for disk, layer in sorted(view.items()):
                try:
                    chain = self.disk_chain(layer, disk)
                except IntegrityError:
                    continue  # a broken chain is verify's to report; rebuild-index is about packs
                for c in chain:
                    if c.id != m.id and f"{c.vm}/{c.id}" in lacking:
                        lacking.setdefault(f"{m.vm}/{m.id}", []).append(
                            f"disk {disk}: depends on point {c.id}, which lacks blobs")
        return lacking

    # -- writing ----------------------------------------------------------------------------------------

    def writer(self, *, on_committed: Committed | None = None, known: set[bytes] | None = None,
               **options: int | None) -> BlobWriter:
        """A :class:`BlobWriter` for one run.

        By default it deduplicates against everything indexed (the whole index is loaded). With *known*
        (an incremental: the blob ids of its parent chains) it deduplicates against those and loads no
        index: a backup's fixed cost then does not grow with the repository's history.
        """
        index = self.load_index() if known is None else Index()
        return BlobWriter(self.backend, self.config, index, on_committed=on_committed, envelope=self.envelope,
                          exclude=self._guard().excluded, known=known, **options)

    def _guard(self) -> CommitGuard:
        """Prune's records as this run knows them: read with the index, or now if no index was loaded."""
        if self.guard is None:
            self.guard = CommitGuard(self.backend, self.envelope)
        return self.guard

    def needed_packs(self, manifest: Manifest) -> set[str]:
        """The packs that hold *manifest*'s blobs (by the loaded index)."""
        return {self.locate(b).pack for rec in manifest.disks.values() for _, _, b in rec.extents if b is not None}

    def commit(self, manifest: Manifest, packs: set[str] | None = None) -> None:
        """Write *manifest* — the commit point. Only call after the run's writer has flushed.

        First the prune check (:meth:`.gc.CommitGuard.check`): a point that needs a pack a prune may be
        deleting is not committed (:class:`~.errors.PruneConflict`). *packs* are the packs to check (a
        backup's :meth:`BlobWriter.packs_needed`); by default every pack holding a blob of *manifest*.
        """
        self._guard().check(self.needed_packs(manifest) if packs is None else packs)
        name = self.envelope.manifest_name(manifest.vm, manifest.id)
        data = self.envelope.seal_manifest(name, manifest.to_bytes())
        if not self.backend.put_if_absent(name, data):
            # A retried conditional PUT whose first attempt landed (the reply was lost) finds its own
            # manifest: that is a success. Anything else is a real collision.
            if self.backend.get(name) != data:
                raise RepositoryError(f"point {manifest.id} of VM {manifest.vm} already exists in {self.url}")
        # After the manifest, not before: a failed first run racing this one into the same new repository
        # deletes the config only when nothing but the config is there (discard_if_new), so once this
        # manifest exists the config can only have vanished before it — and is put back, as it was.
        if self.backend.put_if_absent(CONFIG_NAME, self.config.to_bytes()):
            log.warning("the config of %s had vanished (a failed first backup into the new repository took it "
                        "back while this one ran); wrote it again", self.url)
        self._manifests[(manifest.vm, manifest.id)] = manifest

    def maintenance(self, purpose: str) -> MaintenanceLock:
        """The maintenance lock (``with repo.maintenance("prune"):``): forget, prune, rebuild-index and
        protect exclude each other; backups never wait for it."""
        return MaintenanceLock(self.backend, self.envelope, purpose)

    def drop_cache(self) -> None:
        """Forget the manifests and index read so far. Maintenance reads afresh: manifests may have been
        rewritten in place (``forget``) since this handle read them."""
        self._manifests.clear()
        self._vm_names.clear()
        self._index = None

    def replace_manifest(self, manifest: Manifest) -> None:
        """Rewrite an existing point's manifest in place (maintenance only, under the lock).

        The one exception to "objects are never modified": ``forget`` merging a kept point's layers and
        ``protect`` changing its annotations. The new manifest describes the same point — same id, the
        same bytes of every disk — so a reader that sees either version restores the same disks, and a
        whole-object PUT is atomic (temp file + rename locally, one PUT in S3).
        """
        name = self.envelope.manifest_name(manifest.vm, manifest.id)
        if not self.backend.exists(name):
            raise RepositoryError(f"point {manifest.id} of VM {manifest.vm} vanished from {self.url} (removed by "
                                  "someone else?): nothing was changed")
        self.backend.put(name, self.envelope.seal_manifest(name, manifest.to_bytes()))
        self._manifests[(manifest.vm, manifest.id)] = manifest

    def forget_manifest(self, vm: str, point_id: str) -> None:
        """Delete a point's manifest (``forget``; its packs stay until ``prune``)."""
        self.backend.delete(self.envelope.manifest_name(vm, point_id))
        self._manifests.pop((vm, point_id), None)

    # -- points -----------------------------------------------------------------------------------------

    def vms(self) -> list[str]:
        """The names of the VMs with points (see :meth:`vm_listing`)."""
        return self.vm_listing()[0]

    def unnamed_vms(self) -> dict[str, str]:
        """Format 2: ``points/<token>/`` → why no manifest under it could be read (its VM name is unknown)."""
        return self.vm_listing()[1]

    def vm_listing(self) -> tuple[list[str], dict[str, str]]:
        """The VMs with points, and (format 2) the ``points/<token>/`` whose VM is unknown, with why — from
        one listing. In format 2 the names are only inside the manifests: each token gives its name from
        its newest readable manifest."""
        by_key: dict[str, list[str]] = {}
        for info in self.backend.list("points/"):
            parts = info.name.split("/")
            if len(parts) == 3:
                by_key.setdefault(parts[1], []).append(parts[2])
        named: dict[str, str] = {}
        unnamed: dict[str, str] = {}
        for key, ids in by_key.items():
            vm = self.envelope.vm_from_key(key) or self._vm_names.get(key)
            why = "no manifest"
            for point_id in sorted(ids, reverse=True) if vm is None else ():
                name = f"points/{key}/{point_id}"
                try:
                    m = self._read_manifest(name, f"{name} vanished while it was read")
                except RepositoryError as exc:
                    why = str(exc)
                    continue
                if self.envelope.vm_key(m.vm) != key:
                    why = f"{name} names VM {m.vm!r}, whose points live elsewhere"
                    continue
                vm = self._vm_names[key] = m.vm
                self._manifests.setdefault((m.vm, m.id), m)
                break
            if vm is None:
                unnamed[f"points/{key}/"] = why
            else:
                named[key] = vm
        return sorted(named.values()), unnamed

    def point_ids(self, vm: str) -> list[str]:
        """Ids of the VM's committed points, oldest first (ids sort by creation time)."""
        prefix = f"points/{self.envelope.vm_key(vm)}/"
        return sorted(info.name[len(prefix):] for info in self.backend.list(prefix))

    def _read_manifest(self, name: str, missing: str) -> Manifest:
        """The manifest object *name*, opened and parsed; *missing* is the error if there is none."""
        try:
            data = self.backend.get(name)
        except ObjectNotFound:
            raise RepositoryError(missing) from None
        return Manifest.from_bytes(self.envelope.open_manifest(name, data), name)

    def manifest(self, vm: str, point_id: str) -> Manifest:
        key = (vm, point_id)
        if key not in self._manifests:
            name = self.envelope.manifest_name(vm, point_id)
            m = self._read_manifest(name, f"VM {vm!r} has no point {point_id!r} in {self.url}; 'fleece list --repo "
                                          f"{self.url} --vm {vm}' shows the points that exist")
            if m.id != point_id or m.vm != vm:
                raise IntegrityError(f"{name} describes point {m.id} of VM {m.vm}, not the point its name says")
            self._manifests[key] = m
        return self._manifests[key]

    def scan(self, vm: str) -> PointScan:
        """Read every manifest of *vm*, collecting (not raising) the damaged ones."""
        scan = PointScan([], {})
        for point_id in self.point_ids(vm):
            try:
                scan.points.append(self.manifest(vm, point_id))
            except RepositoryError as exc:
                scan.damaged[point_id] = str(exc)
        return scan

    def latest(self, vm: str) -> Manifest | None:
        """The newest readable point of *vm*."""
        for point_id in reversed(self.point_ids(vm)):
            try:
                return self.manifest(vm, point_id)
            except IntegrityError:
                continue
        return None

    def latest_layers(self, vm: str, disks: Iterable[str]) -> dict[str, Manifest | None]:
        """For each disk, the newest readable point of *vm* that holds it (what its next layer builds on).

        Walks back from the newest point only as far as needed: usually the latest point holds every disk.
        """
        wanted = set(disks)
        found: dict[str, Manifest | None] = dict.fromkeys(wanted)
        for point_id in reversed(self.point_ids(vm)):
            if not wanted:
                break
            try:
                m = self.manifest(vm, point_id)
            except IntegrityError:
                continue
            for disk in wanted & m.disks.keys():
                found[disk] = m
            wanted -= m.disks.keys()
        return found

    def point_view(self, manifest: Manifest, disks: Iterable[str] | None = None, *,
                   ids: Sequence[str] | None = None) -> dict[str, Manifest]:
        """The VM as of *manifest*: each disk it had then, mapped to the point holding that disk's newest layer.

        The rule: the disks of a point are every disk that appears in any point of its VM up to and including
        it (by point id, i.e. creation time), each at the newest of those points that holds it — its layer
        chain runs from there through the per-disk parents. So a ``--disk`` backup of some disks still
        restores the whole VM, the other disks as of their last backup. A manifest cannot tell a disk left out
        by ``--disk`` from a disk removed from the VM, so a removed disk stays in the view (at its last layer):
        restoring one disk too many loses nothing, leaving one out silently could; callers say which disks
        come from older points.

        With *disks*, only those (a disk no point up to *manifest* holds is absent from the result), walking
        back only as far as needed. *ids* are the VM's point ids if the caller has listed them already.

        A damaged manifest on the way raises :class:`IntegrityError`: it may hold a newer layer of a disk, or
        a disk no other point has, so the view is unknown (``--disk`` naming disks found in newer points
        walks back less far and gets past it).
        """
        vm = manifest.vm
        wanted = None if disks is None else set(disks)
        view = {d: manifest for d in sorted(manifest.disks) if wanted is None or d in wanted}
        older = [i for i in reversed(self.point_ids(vm) if ids is None else sorted(ids)) if i < manifest.id]

        def read(point_id: str) -> Manifest | IntegrityError:
            try:
                return self.manifest(vm, point_id)
            except IntegrityError as exc:
                return exc

        if wanted is None and any((vm, i) not in self._manifests for i in older):
            # every older manifest is needed: fetch them in parallel
            found: Iterable[Manifest | IntegrityError] = map_all(read, older, workers=8, name="fleece-manifests",
                                                                     on_close=self.backend.cancel)
        else:
            found = map(read, older)  # lazily: usually the newest few points hold every wanted disk
        for point_id, m in zip(older, found):
            if wanted is not None and wanted <= view.keys():
                break
            if isinstance(m, IntegrityError):
                raise IntegrityError(
                    f"point {point_id} of VM {vm} is damaged ({m}): it may hold a newer layer of a disk, or a "
                    f"disk no other point has, so the VM as of point {manifest.id} is unknown. Name the disks "
                    f"to restore with --disk (point {manifest.id} holds {', '.join(sorted(manifest.disks))}), "
                    "or restore an earlier point; 'fleece verify' shows the damage")
            view.update((d, m) for d in sorted(m.disks.keys() - view.keys()) if wanted is None or d in wanted)
        return view

    def find_point(self, vm: str, point: str | None) -> Manifest:
        """A point by id, or the newest for ``None``/``"latest"``, with errors that list what exists."""
        ids = self.point_ids(vm)
        if not ids:
            vms = self.vms()
            hint = f"VMs in this repository: {', '.join(vms)}" if vms else "the repository has no points yet"
            raise RepositoryError(f"no points for VM {vm!r} in {self.url} ({hint})")
        if point in (None, "latest"):
            return self.manifest(vm, ids[-1])
        if point not in ids:
            matches = [i for i in ids if i.startswith(point)]
            if len(matches) == 1:
                return self.manifest(vm, matches[0])
            if matches:
                shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
                raise UsageError(f"--point {point!r} is ambiguous for VM {vm!r}: it starts {len(matches)} point ids "
                                 f"({shown}); give more of the id")
            shown = ", ".join(ids[-10:])
            raise RepositoryError(f"VM {vm!r} has no point {point!r}; existing points (newest last): {shown}")
        return self.manifest(vm, point)

    def disk_chain(self, manifest: Manifest, disk: str) -> list[Manifest]:
        """The points holding layers of *disk*, from *manifest* back to its full (newest first).

        A ``fleece forget`` running meanwhile merges kept points into self-contained layers *before* it
        deletes what they replace: a parent that vanished under a chain read earlier is therefore looked
        for once more, from freshly read manifests, before the chain is called broken.
        """
        try:
            return self._disk_chain(manifest, disk)
        except IntegrityError as exc:
            if not getattr(exc, "vanished", False):
                raise
            for key in [k for k in self._manifests if k[0] == manifest.vm]:
                del self._manifests[key]
            return self._disk_chain(self.manifest(manifest.vm, manifest.id), disk)

    def _disk_chain(self, manifest: Manifest, disk: str) -> list[Manifest]:
        chain = [manifest]
        seen = {manifest.id}
        while True:
            current = chain[-1]
            record = current.disks.get(disk)
            if record is None:
                raise IntegrityError(f"point {current.id} of VM {manifest.vm} has no disk {disk!r}, but a later "
                                     "incremental of that disk depends on it")
            if record.kind == KIND_FULL:
                return chain
            previous = current.disk_parent(disk)
            if previous is None:
                raise IntegrityError(f"point {current.id}: disk {disk} is incremental but has no parent point")
            if previous in seen:
                raise IntegrityError(f"point {current.id}: parent loop at {previous}")
            try:
                parent = self.manifest(manifest.vm, previous)
            except IntegrityError:
                raise
            except RepositoryError:
                moved = self._layer_copy(manifest.vm, disk, previous)
                if moved is None:
                    broken = IntegrityError(f"the chain of point {manifest.id} (VM {manifest.vm}) is broken: parent "
                                            f"point {previous} of {current.id} is missing")
                    broken.vanished = True  # type: ignore[attr-defined]
                    raise broken from None
                parent = moved
            seen.add(parent.id)
            chain.append(parent)

    def _layer_copy(self, vm: str, disk: str, forgotten: str) -> Manifest | None:
        """The point holding a merged copy of *disk*'s layer as of the *forgotten* point, if any.

        A backup that began before a ``forget`` may commit an incremental whose disk parent the forget
        removed; the forget gave the layer's state (the same bytes, the same bitmap) to the oldest kept
        point after it, as a merged full that says so (``merge.layer_copy``, ``merge.represents``).
        """
        points = self.scan(vm).points
        found = layer_copy(points, disk, forgotten)
        return next((m for m in points if m.id == found), None)

    def resolve(self, manifest: Manifest, disk: str) -> list[Piece]:
        """The flat view of *disk* at *manifest*: what every byte is (newest layer wins)."""
        chain = self.disk_chain(manifest, disk)
        return resolve([m.disks[disk].extents for m in chain], [m.disks[disk].skips for m in chain])

    # -- reading blobs ----------------------------------------------------------------------------------

    def locate(self, blob: bytes) -> Location:
        loc = self.load_index().lookup(blob)
        if loc is None:
            raise _unindexed(blob)
        return loc

    def locate_many(self, blobs: list[bytes], hints: Sequence[str] = ()) -> dict[bytes, Location]:
        """Where *blobs* are (in the order asked). From the index when it is loaded already; otherwise,
        however many they are, by searching the index objects one at a time (``index.find_entries``) and
        never building the table of every blob: first the *hints* (the index objects of the runs that
        wrote the points the blobs come from, ``Manifest.index_hints``: usually one GET each), then, for
        what they do not hold, each listed index object once — and, if blobs are still missing, the ones a
        second listing adds (a prune consolidating meanwhile writes its replacement before it deletes).
        Peak memory: one index object plus the locations found.

        Why never load the index here, however many blobs: this reads each index object at most once, as
        loading does, but keeps only what was asked for — a restore or an audit then costs memory and time
        in proportion to the point, not to the repository. Measured with 1M index entries of other blobs:
        loading took 8–13 s and 340 MiB; locating a point's 16,384 blobs this way 0.2 s with its hint,
        0.4 s without (every index object read), under 50 MiB. A caller that locates many sets of blobs
        without hints (``verify``) loads the index first, and its lookups then come from it.

        A blob found only in a pack a prune condemned is looked for further, and a live copy preferred.
        A blob found nowhere is the error :meth:`locate` raises."""
        if self._index is not None:
            return {b: self.locate(b) for b in blobs}
        if not blobs:
            return {}
        condemned = self._guard().excluded
        found: dict[bytes, Location] = {}
        wanted = set(blobs)  # not found yet, or found only in a condemned pack
        searched: set[str] = set()

        def search(names: Iterable[str]) -> None:
            for name in names:
                if not wanted:
                    return
                if name in searched:
                    continue  # objects never change: one that was searched holds none of what is still wanted
                try:
                    data = self.backend.get(name)
                except ObjectNotFound:
                    continue  # a stale hint, or consolidated by a prune meanwhile (its replacement came first)
                searched.add(name)
                try:
                    entries = find_entries(name.split("/", 1)[1], data, self.envelope.meta, wanted)
                except FormatMismatch:
                    raise
                except IntegrityError as exc:  # the same words as load_index: what is damaged, how to repair
                    raise IntegrityError(f"{exc} (to repair it: fleece rebuild-index --repo {self.url})",
                                         object=name) from None
                del data
                for pack_id, e, header in entries:
                    known = found.get(e.id)
                    if known is None or (known.pack in condemned and pack_id not in condemned):
                        found[e.id] = Location(pack_id, e.offset, e.length, e.raw_length, e.encoding, header)
                    if pack_id not in condemned:
                        wanted.discard(e.id)

        search(dict.fromkeys(h for h in hints if h.startswith("index/")))
        for _ in range(2):  # a prune consolidating meanwhile may delete an object after it was listed
            if not wanted:
                break
            search([info.name for info in self.backend.list("index/")])
        for b in blobs:
            if b not in found:
                raise _unindexed(b)
        return {b: found[b] for b in blobs}

    def read_range(self, pack: str, offset: int, length: int) -> bytes:
        """Raw bytes of a pack; a short read means a truncated pack."""
        name = pack_name(pack)
        try:
            data = self.backend.get(name, offset, length)
        except ObjectNotFound:
            raise self._pack_missing(name) from None
        if len(data) != length:
            raise _pack_truncated(name, offset, offset + length, len(data))
        return data

    def _pack_missing(self, name: str) -> IntegrityError:
        return IntegrityError(f"pack {name} is missing from {self.url}")

    def read_pieces(self, rng: ReadRange, buf: memoryview) -> Iterator[tuple[bytes, Location, memoryview]]:
        """The stored payload of each blob of *rng*, in offset order, read from one request as it arrives
        into *buf* (at least the longest payload; each view is valid until the next): a range is never
        held whole in memory. Gaps between blobs are read past; a pack that ends early is an
        :class:`IntegrityError` naming it."""
        name = pack_name(rng.pack)
        try:
            reader = self.backend.open_range(name, rng.start, rng.end - rng.start)
        except ObjectNotFound:
            raise self._pack_missing(name) from None
        try:
            pos = rng.start
            for blob, loc in sorted(rng.items, key=lambda it: it[1].offset):
                while pos < loc.offset:  # a gap the plan coalesced over
                    skip = min(len(buf), loc.offset - pos)
                    got = reader.readinto(buf[:skip])
                    if got != skip:
                        raise _pack_truncated(name, rng.start, rng.end, pos + got - rng.start)
                    pos += skip
                view = buf[:loc.length]
                got = reader.readinto(view)
                if got != loc.length:
                    raise _pack_truncated(name, rng.start, rng.end, pos + got - rng.start)
                pos += got
                yield blob, loc, view
        finally:
            reader.close()

    def decode(self, blob: bytes, loc: Location, payload: bytes | memoryview) -> bytes:
        """Open (format 2), decompress and verify one blob's payload."""
        where = f"pack {loc.pack} at offset {loc.offset}"
        opened = self.envelope.packs.open(loc.header, blob, payload, pack_name(loc.pack))
        return self._codecs.get().decode(opened, loc.raw_length, loc.encoding, blob, where)

    def decode_into(self, blob: bytes, loc: Location, payload: bytes | memoryview, out: memoryview) -> None:
        """:meth:`decode` into the caller's buffer ``out[:loc.raw_length]`` (see ``Codec.decode_into``)."""
        where = f"pack {loc.pack} at offset {loc.offset}"
        opened = self.envelope.packs.open(loc.header, blob, payload, pack_name(loc.pack))
        self._codecs.get().decode_into(opened, out, loc.raw_length, loc.encoding, blob, where)

    def read_blob(self, blob: bytes) -> bytes:
        loc = self.locate(blob)
        return self.decode(blob, loc, self.read_range(loc.pack, loc.offset, loc.length))

    def plan_reads(self, blobs: Iterable[bytes], max_range: int = 16 << 20,
                   max_gap: int = 256 << 10, hints: Sequence[str] = (),
                   located: Mapping[bytes, Location] | None = None) -> list[ReadRange]:
        """Group *blobs* by pack into coalesced range reads (one GET each, at most *max_range* bytes).
        *located*: locations known already (a chain restore looks up all its layers' blobs at once);
        the others are looked up with *hints* (:meth:`locate_many`)."""
        wanted = list(dict.fromkeys(blobs))
        known = located if located is not None else {}
        where = {b: known[b] for b in wanted if b in known}
        missing = [b for b in wanted if b not in where]
        if missing:
            where.update(self.locate_many(missing, hints))
        by_pack: dict[str, list[tuple[bytes, Location]]] = {}
        for blob, loc in where.items():
            by_pack.setdefault(loc.pack, []).append((blob, loc))
        out: list[ReadRange] = []
        for pack, items in by_pack.items():
            items.sort(key=lambda it: it[1].offset)
            current = ReadRange(pack, items[0][1].offset, items[0][1].offset + items[0][1].length, [items[0]])
            for blob, loc in items[1:]:
                if loc.offset - current.end <= max_gap and loc.offset + loc.length - current.start <= max_range:
                    current.items.append((blob, loc))
                    current.end = max(current.end, loc.offset + loc.length)
                else:
                    out.append(current)
                    current = ReadRange(pack, loc.offset, loc.offset + loc.length, [(blob, loc)])
            out.append(current)
        return out

    def read_blobs(self, rng: ReadRange) -> Iterator[tuple[bytes, bytes]]:
        """Fetch one range read and yield its blobs' verified plaintexts."""
        data = memoryview(self.read_range(rng.pack, rng.start, rng.end - rng.start))
        for blob, loc in rng.items:
            yield blob, self.decode(blob, loc, data[loc.offset - rng.start: loc.offset - rng.start + loc.length])

    def iter_blobs(self, blobs: Iterable[bytes], hints: Sequence[str] = ()) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(id, plaintext)`` for *blobs* (sequentially; restore parallelises over :meth:`plan_reads`).
        *hints*: index objects likely to hold them (see :meth:`locate_many`)."""
        for rng in self.plan_reads(blobs, hints=hints):
            yield from self.read_blobs(rng)


def _unindexed(blob: bytes) -> IntegrityError:
    return IntegrityError(f"blob {blob.hex()} is not in the repository index (a pack or index object is "
                          "missing); run 'fleece verify' and 'fleece rebuild-index'")


#: a slot is a few hundred bytes; a bigger ``keys/`` object is damage, named without being read whole
MAX_SLOT_BYTES = 64 << 10


def read_slots(backend: Backend) -> list[KeySlot]:
    """Every key slot of an encrypted repository; a damaged slot object is an error naming it."""
    slots = []
    for info in backend.list(KEYS_PREFIX):
        if info.size > MAX_SLOT_BYTES:
            raise IntegrityError(f"key slot {info.name} is {info.size} bytes, not a key slot (a few hundred): "
                                 "remove it, or put back a copy", object=info.name)
        try:
            slot = KeySlot.from_json(json.loads(backend.get(info.name, 0, MAX_SLOT_BYTES)), info.name)
        except ObjectNotFound:
            continue  # removed while listed
        except (ValueError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"key slot {info.name} is not readable JSON ({type(exc).__name__}): remove it, or "
                                 "put back a copy", object=info.name) from None
        if f"{KEYS_PREFIX}{slot.id}" != info.name:
            raise IntegrityError(f"{info.name} holds key slot {slot.id}: it was renamed", object=info.name)
        slots.append(slot)
    return slots


def _lockable(backend: Backend) -> None:
    """A new repository under Object Lock needs an S3 bucket made with Object Lock enabled."""
    from .backends.s3 import S3Backend

    s3 = backend_layer(backend, S3Backend)
    if s3 is None:
        raise UsageError(f"{backend.location}: --object-lock needs an S3 bucket (S3 Object Lock); a directory "
                         "cannot lock its files")
    if not s3.lock_enabled():
        raise UsageError(f"bucket {s3.bucket} does not have S3 Object Lock enabled (it can only be turned on "
                         "when a bucket is created): use a new bucket with --create-bucket, or one made with "
                         "object lock")


def _slot_bytes(slot: KeySlot) -> bytes:
    return (json.dumps(slot.to_json(), indent=1, sort_keys=True) + "\n").encode()


def _credential(source: CredentialSource, new: bool) -> Credential | None:
    if source is None:
        return from_environment()
    if isinstance(source, Credential):
        return source
    return source(new)


def _make_slot(keys: Keys, credential: Credential, repo_id: str, access: str, kdf_time: float | None,
               label: str) -> KeySlot:
    seconds = kdf_seconds() if kdf_time is None else kdf_time
    scrypt_n = tune_scrypt(seconds) if credential.kind == "passphrase" else None
    return new_slot(keys, credential.secret, repo=repo_id, kind=credential.kind, access=access, scrypt_n=scrypt_n,
                    label=label)


def _pack_truncated(name: str, start: int, end: int, got: int) -> IntegrityError:
    return IntegrityError(f"pack {name} is truncated: wanted bytes {start}..{end}, got {got}")
