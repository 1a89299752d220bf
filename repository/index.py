"""The index: which pack holds which blob.

Each backup run writes one index object for the packs it uploaded, *after* those packs are durable and
*before* its manifest (the commit point). Layout of ``index/<id>``::

    magic "FLCIDX1\\n" | zstd frame of:
        npacks:u32, then per pack: pack_id[32] count:u32, count × entry

where an entry is exactly a pack table's entry (``PackEntry.encode``: id[32] offset:u64 length:u32
raw_length:u32 encoding:u8 pad[3]) — one layout, written in one place.

Format 2 (encrypted) seals the body and records each pack's sealed key, so that restore opens payloads
without reading the packs' trailers::

    magic "FLCIDX2\n" | sealed with the meta key, associated data "index", of a zstd frame of:
        npacks:u32, then per pack: pack_id[32] header[92] count:u32, count × entry

The object's name is the SHA-256 of its bytes, so a truncated or garbled index is detected on load.
Everything in an index can be regenerated from the packs' own tables (:func:`Repository.rebuild_index`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter

import zstandard

from .codec import ID_SIZE
from .crypto import PACK_HEADER_SIZE, Sealer
from .errors import FormatMismatch, IntegrityError
from .pack import ENTRY_SIZE, PackEntry

MAGIC = b"FLCIDX1\n"
MAGIC2 = b"FLCIDX2\n"
_COUNT = struct.Struct("<I")
_PACK = struct.Struct("<32sI")
_PACK2 = struct.Struct(f"<32s{PACK_HEADER_SIZE}sI")
_AD = b"index"
MAX_INDEX_BODY = 1 << 30
_ENTRY_ID = struct.Struct(f"{ID_SIZE}s{ENTRY_SIZE - ID_SIZE}x")  # an entry's id, the rest skipped
#: :func:`find_entries` searches the bytes for at most this many ids, and walks the entries for more: one
#: search costs ~9.5 ns per entry (``bytes.find``, C), one walk ~115 ns (measured, 1M entries, 52 MB)
FIND_MAX = 12

#: one pack's part of an index: (pack id, its table, its sealed key — empty in format 1)
PackRecord = tuple[str, list[PackEntry], bytes]


@dataclass(frozen=True, slots=True)
class Location:
    """Where to find a blob: pack id (hex) and its entry in that pack."""

    pack: str
    offset: int
    length: int
    raw_length: int
    encoding: int
    header: bytes = b""  #: the pack's sealed key (format 2)


def encode_index(packs: Iterable[PackRecord] | Iterable[tuple[str, list[PackEntry]]],
                 meta: Sealer | None = None) -> tuple[str, bytes]:
    """Serialize packs' tables into an index object; returns ``(index id, bytes)``.

    With *meta* (format 2) the body is sealed and each pack's header recorded; without, format 1.
    """
    parts = []
    count = 0
    for pack in packs:
        pack_id, entries = pack[0], pack[1]
        count += 1
        if meta is None:
            parts.append(_PACK.pack(bytes.fromhex(pack_id), len(entries)))
        else:
            parts.append(_PACK2.pack(bytes.fromhex(pack_id), pack[2], len(entries)))  # type: ignore[misc]
        parts.extend(e.encode() for e in entries)
    body = zstandard.ZstdCompressor(level=3).compress(_COUNT.pack(count) + b"".join(parts))
    data = MAGIC + body if meta is None else MAGIC2 + meta.seal(body, _AD)
    return hashlib.sha256(data).hexdigest(), data


def _body(index_id: str, data: bytes, meta: Sealer | None) -> bytes:
    """An index object's decompressed tables, checked against its name (and, with *meta*, its seal)."""
    where = f"index/{index_id}"
    if hashlib.sha256(data).hexdigest() != index_id:
        raise IntegrityError(f"{where} does not match its name (truncated or garbled)", object=where)
    magic = MAGIC if meta is None else MAGIC2
    if data.startswith(MAGIC2 if meta is None else MAGIC):
        found, config = (("an encrypted (format 2)", "unencrypted") if meta is None
                         else ("a plaintext (format 1)", "encrypted"))
        raise FormatMismatch(f"{where} is {found} index but the config says the repository is {config}: the "
                             "config was replaced; put back the original config (and keys/) — fleece will not "
                             "write on or repair this repository", object=where)
    if not data.startswith(magic):
        raise IntegrityError(f"{where} is not a fleece index", object=where)
    sealed = data[len(magic):]
    if meta is not None:
        sealed = meta.open(sealed, _AD, where)
    try:
        # the frame says how big it decompresses to, and zstandard allocates that at once: a planted frame
        # claiming terabytes must be damage, not a MemoryError (an index of 20 million blobs is ~1 GiB)
        claimed = zstandard.frame_content_size(sealed)
        if claimed > MAX_INDEX_BODY:
            raise IntegrityError(f"{where} claims {claimed} bytes of tables (at most {MAX_INDEX_BODY})", object=where)
        body = zstandard.ZstdDecompressor().decompress(sealed, max_output_size=MAX_INDEX_BODY)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{where} does not decompress ({exc})", object=where) from None
    return body


def decode_index(index_id: str, data: bytes, meta: Sealer | None = None) -> list[PackRecord]:
    """Parse an index object, checking it against its name (and, with *meta*, its seal)."""
    where = f"index/{index_id}"
    body = _body(index_id, data, meta)
    record = _PACK if meta is None else _PACK2
    try:
        (npacks,) = _COUNT.unpack_from(body, 0)
        pos = _COUNT.size
        out: list[PackRecord] = []
        for _ in range(npacks):
            fields = record.unpack_from(body, pos)
            raw_pack, count, header = fields[0], fields[-1], (fields[1] if meta is not None else b"")
            pos += record.size
            entries = [PackEntry.decode(body, pos + i * ENTRY_SIZE) for i in range(count)]
            pos += count * ENTRY_SIZE
            out.append((raw_pack.hex(), entries, header))
    except struct.error:
        raise IntegrityError(f"{where} is truncated inside its tables", object=where) from None
    if pos != len(body):
        raise IntegrityError(f"{where} has {len(body) - pos} trailing bytes", object=where)
    return out


def find_entries(index_id: str, data: bytes, meta: Sealer | None, wanted: set[bytes]
                 ) -> list[tuple[str, PackEntry, bytes]]:
    """The entries of *wanted* blobs in one index object, without building the whole table in memory:
    the packs' records are walked (one step per pack), then for a few ids (at most :data:`FIND_MAX`) each
    is searched in C (``bytes.find``), an offset counting only where a 52-byte entry starts; for more —
    a restore locating a disk's 100,000 blobs — the entries' ids are walked once at the entry stride and
    tested against the set (C iterators: ``struct.iter_unpack``, ``set.__contains__``). Both give every
    entry of a wanted id, in any order. For a backup that needs a few locations (its audit), or a restore
    that needs a point's, in a repository of millions of blobs."""
    where = f"index/{index_id}"
    body = _body(index_id, data, meta)
    record = _PACK if meta is None else _PACK2
    regions: list[tuple[int, int, str, bytes]] = []  # (entries start, end, pack id, header)
    try:
        (npacks,) = _COUNT.unpack_from(body, 0)
        pos = _COUNT.size
        for _ in range(npacks):
            fields = record.unpack_from(body, pos)
            pos += record.size
            end = pos + fields[-1] * ENTRY_SIZE
            regions.append((pos, end, fields[0].hex(), fields[1] if meta is not None else b""))
            pos = end
    except struct.error:
        raise IntegrityError(f"{where} is truncated inside its tables", object=where) from None
    if pos != len(body):
        raise IntegrityError(f"{where} has {len(body) - pos} trailing bytes", object=where)
    out = []
    if len(wanted) > FIND_MAX:
        view = memoryview(body)
        for start, end, pack_id, header in regions:
            ids = map(itemgetter(0), _ENTRY_ID.iter_unpack(view[start:end]))
            for at in itertools.compress(range(start, end, ENTRY_SIZE), map(wanted.__contains__, ids)):
                out.append((pack_id, PackEntry.decode(body, at), header))
        return out
    starts = [r[0] for r in regions]
    for ident in wanted:
        at = body.find(ident)
        while at != -1:
            i = bisect.bisect_right(starts, at) - 1
            if i >= 0 and at < regions[i][1] and (at - regions[i][0]) % ENTRY_SIZE == 0:
                out.append((regions[i][2], PackEntry.decode(body, at), regions[i][3]))
            at = body.find(ident, at + 1)
    return out


class Index:
    """In-memory map blob id → :class:`Location`, merged from every index object of the repository."""

    def __init__(self, keep_tables: bool = False) -> None:
        self._blobs: dict[bytes, Location] = {}
        self.packs: set[str] = set()
        #: With *keep_tables* (for ``verify`` and ``rebuild-index``): pack id → each distinct table the index
        #: objects give for that pack → the index objects that give it. Two index objects listing one pack
        #: (a rebuilt index next to an old one) must agree, and each must agree with the pack's own table.
        self.tables: dict[str, dict[tuple[PackEntry, ...], list[str]]] | None = {} if keep_tables else None
        #: with *keep_tables*: pack id → the sealed key the index objects give for it (format 2)
        self.headers: dict[str, bytes] = {}
        #: packs a prune condemned (``repository.gc``): a blob located in one of them moves to any other
        #: pack that holds it, so reads and backups prefer copies that are not about to be deleted
        self.condemned: set[str] = set()

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, blob: bytes) -> bool:
        return blob in self._blobs

    def add_pack(self, pack_id: str, entries: Iterable[PackEntry], source: str = "", header: bytes = b"") -> None:
        """Merge one pack's table (*source*: the index object it came from, kept with *keep_tables*;
        *header*: the pack's sealed key in format 2)."""
        if self.tables is not None:
            entries = tuple(entries)
            self.tables.setdefault(pack_id, {}).setdefault(entries, []).append(source)
            self.headers.setdefault(pack_id, header)
        self.packs.add(pack_id)
        demoted = pack_id in self.condemned
        for e in entries:
            # First writer wins: a blob present in two packs (two concurrent runs) is equally good in both —
            # unless the first is condemned and this one is not.
            known = self._blobs.get(e.id)
            if known is None or (not demoted and known.pack in self.condemned):
                self._blobs[e.id] = Location(pack_id, e.offset, e.length, e.raw_length, e.encoding, header)

    def lookup(self, blob: bytes) -> Location | None:
        return self._blobs.get(blob)

    def ids(self) -> Iterable[bytes]:
        return self._blobs.keys()
