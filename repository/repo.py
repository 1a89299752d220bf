"""The repository: one object the exporter writes points into and restore reads them back from.

Write ordering (the invariant that makes backups lock-free and crash-safe):
packs durable → index durable → manifest written with put-if-absent (the commit point). Readers trust
only points whose manifest exists; packs or indexes of runs that never committed are garbage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .backends import Backend, open_backend
from .chain import Piece, resolve
from .codec import CodecPool
from .config import CONFIG_NAME, RepoConfig
from .errors import IntegrityError, ObjectNotFound, RepositoryError
from .index import Index, Location, decode_index, encode_index
from .manifest import KIND_FULL, Manifest, manifest_name, vm_from_key, vm_key
from .pack import PackEntry, pack_name, parse_footer, parse_table, table_span, FOOTER_SIZE
from .writer import BlobWriter


@dataclass
class ReadRange:
    """One ranged read of a pack and the blobs it covers."""

    pack: str
    start: int
    end: int
    items: list[tuple[bytes, Location]]


@dataclass
class PointScan:
    """Every readable manifest of a VM (oldest first) and the ones that could not be read."""

    points: list[Manifest]
    damaged: dict[str, str]


class Repository:
    """Open with :meth:`open`; all methods are safe to call from several threads except :meth:`writer`'s
    returned object, which has its own rules."""

    def __init__(self, backend: Backend, config: RepoConfig, url: str = "") -> None:
        self.backend = backend
        self.config = config
        self.url = url or backend.location
        self._index: Index | None = None
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._codecs = CodecPool(config.compression.get("level", 3))

    # -- opening ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = False, config: RepoConfig | None = None,
             **backend_options: object) -> Repository:
        """Open the repository at *url*; with *create*, make it (and its ``config``) if it does not exist."""
        backend = open_backend(url, create=create, **backend_options)
        try:
            data = backend.get(CONFIG_NAME)
        except ObjectNotFound:
            if not create:
                raise RepositoryError(f"no fleece repository at {backend.location} (no 'config' object): "
                                      f"check --repo, or create one with 'fleece init --repo {url}'") from None
            fresh = config or RepoConfig()
            fresh.validate(backend.location)
            if not backend.put_if_absent(CONFIG_NAME, fresh.to_bytes()):
                data = backend.get(CONFIG_NAME)  # someone else created it first: use theirs
            else:
                data = fresh.to_bytes()
        return cls(backend, RepoConfig.from_bytes(data, backend.location), url)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- index ------------------------------------------------------------------------------------------

    def load_index(self, refresh: bool = False) -> Index:
        """Merge every ``index/*`` object (cached). A damaged index object is an error, never skipped."""
        if self._index is not None and not refresh:
            return self._index
        index, damaged = self.load_index_report()
        if damaged:
            raise next(iter(damaged.values()))
        self._index = index
        return index

    def load_index_report(self) -> tuple[Index, dict[str, IntegrityError]]:
        """Every readable index object merged, plus the damaged ones (for ``verify``)."""
        index = Index()
        damaged: dict[str, IntegrityError] = {}
        for info in self.backend.list("index/"):
            index_id = info.name.split("/", 1)[1]
            try:
                for pack_id, entries in decode_index(index_id, self.backend.get(info.name)):
                    index.add_pack(pack_id, entries)
            except IntegrityError as exc:
                damaged[info.name] = exc
        return index, damaged

    def pack_table(self, pack_id: str) -> list[PackEntry]:
        """Read a pack's own blob table with two small range reads."""
        name = pack_name(pack_id)
        size = self.backend.head(name).size
        if size < FOOTER_SIZE:
            raise IntegrityError(f"pack {name} is truncated ({size} bytes)")
        count = parse_footer(self.backend.get(name, size - FOOTER_SIZE, FOOTER_SIZE), size, name)
        tail = self.backend.get(name, size - table_span(count), table_span(count))
        return parse_table(tail, size, name)

    def rebuild_index(self) -> tuple[int, int]:
        """Regenerate the index from the packs' own tables; returns ``(packs, blobs)``.

        The new index object is written before the old ones are deleted, so a crash in between leaves
        a repository with redundant (harmless) index entries, never one without.
        """
        old = [info.name for info in self.backend.list("index/")]
        packs = []
        for info in self.backend.list("data/"):
            pack_id = info.name.rsplit("/", 1)[1]
            packs.append((pack_id, self.pack_table(pack_id)))
        index_id, data = encode_index(packs)
        self.backend.put(f"index/{index_id}", data)
        for name in old:
            if name != f"index/{index_id}":
                self.backend.delete(name)
        self._index = None
        return len(packs), sum(len(e) for _, e in packs)

    # -- writing ----------------------------------------------------------------------------------------

    def writer(self, **options: int | None) -> BlobWriter:
        """A :class:`BlobWriter` for one run (deduplicating against everything already indexed)."""
        return BlobWriter(self.backend, self.config, self.load_index(), **options)

    def commit(self, manifest: Manifest) -> None:
        """Write *manifest* — the commit point. Only call after the run's writer has flushed."""
        name = manifest_name(manifest.vm, manifest.id)
        data = manifest.to_bytes()
        if not self.backend.put_if_absent(name, data):
            # A retried conditional PUT whose first attempt landed (the reply was lost) finds its own
            # manifest: that is a success. Anything else is a real collision.
            if self.backend.get(name) != data:
                raise RepositoryError(f"point {manifest.id} of VM {manifest.vm} already exists in {self.url}")
        self._manifests[(manifest.vm, manifest.id)] = manifest

    # -- points -----------------------------------------------------------------------------------------

    def vms(self) -> list[str]:
        return sorted({vm_from_key(info.name.split("/")[1]) for info in self.backend.list("points/")})

    def point_ids(self, vm: str) -> list[str]:
        """Ids of the VM's committed points, oldest first (ids sort by creation time)."""
        prefix = f"points/{vm_key(vm)}/"
        return sorted(info.name[len(prefix):] for info in self.backend.list(prefix))

    def manifest(self, vm: str, point_id: str) -> Manifest:
        key = (vm, point_id)
        if key not in self._manifests:
            name = manifest_name(vm, point_id)
            try:
                data = self.backend.get(name)
            except ObjectNotFound:
                raise RepositoryError(f"VM {vm!r} has no point {point_id!r} in {self.url}; "
                                      f"'fleece list --repo {self.url} --vm {vm}' shows the points that exist"
                                      ) from None
            m = Manifest.from_bytes(data, name)
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
            shown = ", ".join(ids[-10:])
            raise RepositoryError(f"VM {vm!r} has no point {point!r}; existing points (newest last): {shown}")
        return self.manifest(vm, point)

    def disk_chain(self, manifest: Manifest, disk: str) -> list[Manifest]:
        """The points holding layers of *disk*, from *manifest* back to its full (newest first)."""
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
                raise IntegrityError(f"the chain of point {manifest.id} (VM {manifest.vm}) is broken: parent point "
                                     f"{previous} of {current.id} is missing") from None
            seen.add(parent.id)
            chain.append(parent)

    def resolve(self, manifest: Manifest, disk: str) -> list[Piece]:
        """The flat view of *disk* at *manifest*: what every byte is (newest layer wins)."""
        return resolve([m.disks[disk].extents for m in self.disk_chain(manifest, disk)])

    # -- reading blobs ----------------------------------------------------------------------------------

    def locate(self, blob: bytes) -> Location:
        loc = self.load_index().lookup(blob)
        if loc is None:
            raise IntegrityError(f"blob {blob.hex()} is not in the repository index (a pack or index object is "
                                 "missing); run 'fleece verify' and 'fleece rebuild-index'")
        return loc

    def read_range(self, pack: str, offset: int, length: int) -> bytes:
        """Raw bytes of a pack; a short read means a truncated pack."""
        name = pack_name(pack)
        try:
            data = self.backend.get(name, offset, length)
        except ObjectNotFound:
            raise IntegrityError(f"pack {name} is missing from {self.url}") from None
        if len(data) != length:
            raise IntegrityError(f"pack {name} is truncated: wanted bytes {offset}..{offset + length}, "
                                 f"got {len(data)}")
        return data

    def decode(self, blob: bytes, loc: Location, payload: bytes | memoryview) -> bytes:
        """Decompress and verify one blob's payload."""
        where = f"pack {loc.pack} at offset {loc.offset}"
        return self._codecs.get().decode(payload, loc.raw_length, loc.encoding, blob, where)

    def read_blob(self, blob: bytes) -> bytes:
        loc = self.locate(blob)
        return self.decode(blob, loc, self.read_range(loc.pack, loc.offset, loc.length))

    def plan_reads(self, blobs: Iterable[bytes], max_range: int = 16 << 20,
                   max_gap: int = 256 << 10) -> list[ReadRange]:
        """Group *blobs* by pack into coalesced range reads (one GET each, at most *max_range* bytes)."""
        by_pack: dict[str, list[tuple[bytes, Location]]] = {}
        for blob in dict.fromkeys(blobs):
            loc = self.locate(blob)
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

    def iter_blobs(self, blobs: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(id, plaintext)`` for *blobs* (sequentially; restore parallelises over :meth:`plan_reads`)."""
        for rng in self.plan_reads(blobs):
            yield from self.read_blobs(rng)
