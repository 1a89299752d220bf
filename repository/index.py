"""The index: which pack holds which blob.

Each backup run writes one index object for the packs it uploaded, *after* those packs are durable and
*before* its manifest (the commit point). Layout of ``index/<id>``::

    magic "FLCIDX1\\n" | zstd frame of:
        npacks:u32, then per pack: pack_id[32] count:u32, count × entry

where an entry is exactly a pack table's entry (``PackEntry.encode``: id[32] offset:u64 length:u32
raw_length:u32 encoding:u8 pad[3]) — one layout, written in one place.

The object's name is the SHA-256 of its bytes, so a truncated or garbled index is detected on load.
Everything in an index can be regenerated from the packs' own tables (:func:`Repository.rebuild_index`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import zstandard

from .errors import IntegrityError
from .pack import ENTRY_SIZE, PackEntry

MAGIC = b"FLCIDX1\n"
_COUNT = struct.Struct("<I")
_PACK = struct.Struct("<32sI")


@dataclass(frozen=True, slots=True)
class Location:
    """Where to find a blob: pack id (hex) and its entry in that pack."""

    pack: str
    offset: int
    length: int
    raw_length: int
    encoding: int


def encode_index(packs: Iterable[tuple[str, list[PackEntry]]]) -> tuple[str, bytes]:
    """Serialize packs' tables into an index object; returns ``(index id, bytes)``."""
    parts = []
    count = 0
    for pack_id, entries in packs:
        count += 1
        parts.append(_PACK.pack(bytes.fromhex(pack_id), len(entries)))
        parts.extend(e.encode() for e in entries)
    body = _COUNT.pack(count) + b"".join(parts)
    data = MAGIC + zstandard.ZstdCompressor(level=3).compress(body)
    return hashlib.sha256(data).hexdigest(), data


def decode_index(index_id: str, data: bytes) -> list[tuple[str, list[PackEntry]]]:
    """Parse an index object, checking it against its name."""
    where = f"index/{index_id}"
    if hashlib.sha256(data).hexdigest() != index_id:
        raise IntegrityError(f"{where} does not match its name (truncated or garbled)")
    if not data.startswith(MAGIC):
        raise IntegrityError(f"{where} is not a fleece index")
    try:
        body = zstandard.ZstdDecompressor().decompress(data[len(MAGIC):])
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{where} does not decompress ({exc})") from None
    try:
        (npacks,) = _COUNT.unpack_from(body, 0)
        pos = _COUNT.size
        out = []
        for _ in range(npacks):
            raw_pack, count = _PACK.unpack_from(body, pos)
            pos += _PACK.size
            entries = [PackEntry.decode(body, pos + i * ENTRY_SIZE) for i in range(count)]
            pos += count * ENTRY_SIZE
            out.append((raw_pack.hex(), entries))
    except struct.error:
        raise IntegrityError(f"{where} is truncated inside its tables") from None
    if pos != len(body):
        raise IntegrityError(f"{where} has {len(body) - pos} trailing bytes")
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

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, blob: bytes) -> bool:
        return blob in self._blobs

    def add_pack(self, pack_id: str, entries: Iterable[PackEntry], source: str = "") -> None:
        """Merge one pack's table (*source*: the index object it came from, kept with *keep_tables*)."""
        if self.tables is not None:
            entries = tuple(entries)
            self.tables.setdefault(pack_id, {}).setdefault(entries, []).append(source)
        self.packs.add(pack_id)
        for e in entries:
            # First writer wins: a blob present in two packs (two concurrent runs) is equally good in both.
            self._blobs.setdefault(e.id, Location(pack_id, e.offset, e.length, e.raw_length, e.encoding))

    def lookup(self, blob: bytes) -> Location | None:
        return self._blobs.get(blob)

    def ids(self) -> Iterable[bytes]:
        return self._blobs.keys()
