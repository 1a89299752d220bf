"""Packs: many blobs in one object, self-describing — in format 1 (plaintext) and format 2 (sealed).

Format 1 (all integers little-endian)::

    payload of blob 0 | payload of blob 1 | ... | payload of blob N-1
    table:  N entries of  id[32] offset:u64 length:u32 raw_length:u32 encoding:u8 pad[3]
    footer: N:u32  sha256(table)[32]  magic "FLCPACK1"

Format 2 (:class:`SealedPacks`)::

    sealed payload 0 | ... | sealed payload N-1          each nonce|ciphertext|tag under the pack key,
                                                         associated data "blob " + blob id
    header:       the pack key sealed to the repository's X25519 public key (92 bytes)
    sealed table: the N entries above, sealed with the meta key, associated data "pack table " + header
    footer:       N:u32  magic "FLCPACK2"

Both layouts are behind one small interface (:class:`PlainPacks`, :class:`SealedPacks`): the builder,
the writer and the readers never branch on the format.

The pack's name is the SHA-256 of its trailer (which lists every blob's content id), and its own table
means the index can always be rebuilt from the packs alone (``fleece`` never depends on an index it
cannot regenerate). Packing 4 MiB blobs into 16–32 MiB objects keeps the S3 request count per GiB low.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from .codec import ID_SIZE, Encoded
from .crypto import OVERHEAD, PACK_HEADER_SIZE, Sealer
from .errors import FormatMismatch, IntegrityError
from .spill import Spill

if TYPE_CHECKING:
    from .crypto import Keys

MAGIC = b"FLCPACK1"
_PACK_ID = re.compile(r"[0-9a-f]{64}")
_ENTRY = struct.Struct("<32sQIIB3x")  # one blob's entry: in a pack's table and, the same bytes, in an index
_FOOTER = struct.Struct("<I32s8s")
FOOTER_SIZE = _FOOTER.size
ENTRY_SIZE = _ENTRY.size


@dataclass(frozen=True, slots=True)
class PackEntry:
    """Where one blob lives inside a pack."""

    id: bytes
    offset: int
    length: int
    raw_length: int
    encoding: int

    def encode(self) -> bytes:
        """The entry's ``ENTRY_SIZE`` bytes, as a pack's table and an index object hold them."""
        return _ENTRY.pack(self.id, self.offset, self.length, self.raw_length, self.encoding)

    @classmethod
    def decode(cls, buf: bytes | memoryview, pos: int) -> PackEntry:
        """The entry at *pos* of *buf* (``struct.error`` if *buf* ends before it)."""
        return cls(*_ENTRY.unpack_from(buf, pos))


def pack_name(pack_id: str) -> str:
    """Backend object name of a pack (two-level fan-out keeps local directories small)."""
    return f"data/{pack_id[:2]}/{pack_id}"


class PackBuilder:
    """Accumulates encoded blobs and produces one finished pack, in a :class:`~.spill.Spill`.

    The pack's bytes go to a private unnamed file as they are packed, not to a buffer of the pack's size:
    a writer has a pack filling while others upload, and those buffers were most of a backup's RSS
    (see ``spill``). One builder (and its file) is reused for every pack it builds. Sealing (format 2)
    goes through a :class:`Stage`.
    """

    def __init__(self, capacity: int, layout: PackLayout | None = None,
                 directory: str | os.PathLike[str] | None = None, stage: Stage | None = None) -> None:
        self.capacity = capacity
        #: where a sealed blob is built; builders that never add concurrently may share one
        self._stage = stage or Stage()
        self._spill = Spill(directory)
        self._entries: list[PackEntry] = []
        self.size = 0
        self.layout: PackLayout = layout or PLAIN
        self._key: Sealer | None = None
        self._header = b""
        self._finished: str | None = None  # the pack id, once the trailer is written

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def header(self) -> bytes:
        """The pack's sealed key (format 2; empty in format 1), as the index records it."""
        return self._header

    def fits(self, blob: Encoded) -> bool:
        need = self.size + len(blob.payload) + self.layout.overhead + self.layout.span(len(self._entries) + 1)
        return need <= self.capacity

    def add(self, blob: Encoded) -> None:
        if not self.fits(blob) or self._finished is not None:
            raise ValueError("blob does not fit in this pack (or the pack is finished)")
        if not self._entries:
            self._key, self._header = self.layout.new_key()  # a fresh key for every pack
        if self.layout.overhead:
            stage = self._stage.get(len(blob.payload) + self.layout.overhead)
            n = self.layout.write(self._key, blob.id, blob.payload, stage)
            self._spill.write(stage[:n])
        else:  # plaintext layout: the payload is stored as it is, no staging copy
            n = len(blob.payload)
            self._spill.write(blob.payload)
        self._entries.append(PackEntry(blob.id, self.size, n, blob.raw_length, blob.encoding))
        self.size += n

    def finish(self) -> tuple[str, Spill, list[PackEntry]]:
        """Return ``(pack id, pack bytes, entries)``. The bytes are valid until :meth:`reset`."""
        if self._finished is None:
            trailer = self.layout.trailer(self._entries, self._header)
            self._spill.write(trailer)
            self._finished = pack_id_of(trailer)
        return self._finished, self._spill, self._entries

    def reset(self) -> None:
        self._entries = []
        self.size = 0
        self._key, self._header = None, b""
        self._finished = None
        self._spill.reset()

    def close(self) -> None:
        """Release the file (only once nothing reads the last pack any more)."""
        self._spill.close()


class Stage:
    """A growable, reused buffer to seal one blob into before it is written to its pack's file.

    One per writer, shared by its builders: they add blobs one at a time (under the writer's pack lock),
    so one buffer serves them all. Allocated once and grown in whole MiB: a fresh buffer per blob
    page-faults as much CPU as hashing the data."""

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        if self._buf is None or len(self._buf) < size:
            self._buf = mmap.mmap(-1, -(-size // (1 << 20)) << 20)
        return memoryview(self._buf)


def pack_id_of(trailer: bytes | memoryview) -> str:
    """A pack's id: the SHA-256 of its trailer (table + footer).

    The table holds every blob's id (the hash of its plaintext) with its offset, length and encoding,
    so the name is content-derived without a second hash pass over the compressed bytes; each
    payload is in turn verified against its blob id whenever it is read.
    """
    return hashlib.sha256(trailer).hexdigest()


def table_span(count: int) -> int:
    """Bytes taken by the table and footer of a pack holding *count* blobs."""
    return count * ENTRY_SIZE + FOOTER_SIZE


def parse_footer(footer: bytes, pack_size: int, name: str) -> int:
    """Validate a pack footer and return the number of entries in its table."""
    if footer[-len(MAGIC2):] == MAGIC2:
        raise _mismatch(name, "an encrypted (format 2) pack", "unencrypted (format 1)")
    if len(footer) != FOOTER_SIZE or footer[-len(MAGIC):] != MAGIC:
        raise IntegrityError(f"pack {name} has no valid footer (truncated or not a fleece pack)")
    count, _, _ = _FOOTER.unpack(footer)
    if table_span(count) > pack_size:
        raise IntegrityError(f"pack {name} claims {count} blobs but is only {pack_size} bytes long (truncated?)")
    return count


def parse_table(tail: bytes, pack_size: int, name: str) -> list[PackEntry]:
    """Parse the table + footer at the end of a pack (*tail* = the last ``table_span(n)`` bytes)."""
    count = parse_footer(tail[-FOOTER_SIZE:], pack_size, name)
    if len(tail) < table_span(count):
        raise IntegrityError(f"pack {name}: short read of its blob table")
    table = tail[len(tail) - table_span(count):-FOOTER_SIZE]
    _, digest, _ = _FOOTER.unpack(tail[-FOOTER_SIZE:])
    if hashlib.sha256(table).digest() != digest:
        raise IntegrityError(f"pack {name}: its blob table is garbled (checksum mismatch)")
    return decode_table(table, count, pack_size - table_span(count), name)


def decode_table(table: bytes | memoryview, count: int, payload_end: int, name: str) -> list[PackEntry]:
    """The *count* entries of a (plaintext) blob table, each checked to lie within the pack's payloads."""
    entries = []
    for i in range(count):
        e = PackEntry.decode(table, i * ENTRY_SIZE)
        if e.offset + e.length > payload_end:
            raise IntegrityError(f"pack {name}: blob {e.id.hex()} lies outside the pack's data", object=name)
        entries.append(e)
    return entries


def encode_table(entries: Sequence[PackEntry]) -> bytes:
    return b"".join(e.encode() for e in entries)


def verify_trailer(pack_id: str, tail: bytes, pack_size: int, name: str | None = None) -> list[PackEntry]:
    """Parse a pack's trailer and check it against the pack's name; returns the blob table.

    *tail* is at least the last ``table_span(n)`` bytes of the pack; *name* is what messages call the pack
    (default: its id). Checks, in order: the magic, that the table fits the pack, the table's checksum,
    every entry within the payload area, and that the pack's id is the SHA-256 of its trailer.
    """
    name = name or pack_id
    count = parse_footer(tail[-FOOTER_SIZE:], pack_size, name)
    if len(tail) < table_span(count):
        raise IntegrityError(f"pack {name}: short read of its blob table")
    trailer = tail[len(tail) - table_span(count):]
    entries = parse_table(trailer, pack_size, name)
    if pack_id_of(trailer) != pack_id:
        raise IntegrityError(f"pack {name}: its blob table does not match its name (damaged or renamed)")
    return entries


def pack_size(entries: Sequence[PackEntry], span: Callable[[int], int] = table_span) -> int:
    """The exact size of a pack holding *entries*: payloads back to back from offset 0, then the trailer
    (*span*: its size for a number of entries, the layout's own; format 1 by default).

    A pack of any other size (listed by the backend) is truncated or has bytes appended — detectable from
    a listing and an index alone, without reading the pack.
    """
    return max((e.offset + e.length for e in entries), default=0) + span(len(entries))


def is_pack_id(text: str) -> bool:
    """Whether *text* has the form of a pack id (64 lowercase hex digits)."""
    return _PACK_ID.fullmatch(text) is not None


def verify_pack_bytes(pack_id: str, data: bytes) -> list[PackEntry]:
    """Check a whole pack's trailer against its name and return its table (payloads: see codec)."""
    if len(data) < FOOTER_SIZE:
        raise IntegrityError(f"pack {pack_id} is truncated ({len(data)} bytes)")
    return verify_trailer(pack_id, data, len(data))


def _mismatch(name: str, found: str, config: str) -> FormatMismatch:
    return FormatMismatch(f"pack {name} is {found} but the config says the repository is {config}: the config was "
                          "replaced; put back the original config (and keys/) — fleece will not write on or "
                          "repair this repository", object=name)


MAGIC2 = b"FLCPACK2"


class PlainPacks:
    """Format 1 packs: payloads as they are, a plaintext table checked by SHA-256."""

    overhead = 0  #: bytes a stored payload is longer than the encoded blob
    footer_size = FOOTER_SIZE

    def new_key(self) -> tuple[Sealer | None, bytes]:
        return None, b""

    def write(self, key: Sealer | None, blob: bytes, payload: bytes | bytearray | memoryview, out: memoryview) -> int:
        """Store one encoded blob at the start of *out*; returns the stored length."""
        out[:len(payload)] = payload
        return len(payload)

    def open(self, header: bytes, blob: bytes, payload: bytes | memoryview, where: str) -> bytes | memoryview:
        return payload

    def span(self, count: int) -> int:
        return table_span(count)

    def count(self, footer: bytes, pack_size: int, name: str) -> int:
        return parse_footer(footer, pack_size, name)

    def trailer(self, entries: Sequence[PackEntry], header: bytes) -> bytes:
        table = encode_table(entries)
        return table + _FOOTER.pack(len(entries), hashlib.sha256(table).digest(), MAGIC)

    def verify(self, pack_id: str, tail: bytes, pack_size: int, name: str) -> tuple[list[PackEntry], bytes]:
        """The pack's table and header from its last bytes, checked against its name (see
        :func:`verify_trailer`)."""
        return verify_trailer(pack_id, tail, pack_size, name), b""

    def size(self, entries: Sequence[PackEntry]) -> int:
        """The exact size of a pack holding *entries* (see :func:`pack_size`)."""
        return pack_size(entries, self.span)


_FOOTER2 = struct.Struct("<I8s")


class SealedPacks:
    """Format 2 packs (module docstring): every payload sealed under the pack's own key, the table under
    the repository's meta key, bound to the pack key's header.

    The pack id is still the SHA-256 of the trailer (header + sealed table + footer): the sealed table
    authenticates every entry, every entry's blob id is bound into its payload's seal, and the header
    binds the pack key to the table, so nothing in a pack can be replaced or moved unnoticed.
    """

    overhead = OVERHEAD
    footer_size = _FOOTER2.size

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def new_key(self) -> tuple[Sealer | None, bytes]:
        return self.keys.new_pack_key()

    def write(self, key: Sealer | None, blob: bytes, payload: bytes | bytearray | memoryview, out: memoryview) -> int:
        assert key is not None
        return key.seal_into(payload, b"blob " + blob, out)

    def open(self, header: bytes, blob: bytes, payload: bytes | memoryview, where: str) -> bytes | memoryview:
        return self.keys.pack_key(header, where).open(payload, b"blob " + blob, f"blob {blob.hex()} in pack {where}",
                                                      where)

    def span(self, count: int) -> int:
        return PACK_HEADER_SIZE + count * ENTRY_SIZE + OVERHEAD + _FOOTER2.size

    def count(self, footer: bytes, pack_size: int, name: str) -> int:
        if footer[-len(MAGIC):] == MAGIC:
            raise _mismatch(name, "a plaintext (format 1) pack", "encrypted (format 2)")
        if len(footer) != _FOOTER2.size or footer[-len(MAGIC2):] != MAGIC2:
            raise IntegrityError(f"pack {name} has no valid footer (truncated or not a fleece format 2 pack)",
                                 object=name)
        (count, _) = _FOOTER2.unpack(footer)
        if self.span(count) > pack_size:
            raise IntegrityError(f"pack {name} claims {count} blobs but is only {pack_size} bytes long (truncated?)",
                                 object=name)
        return count

    def trailer(self, entries: Sequence[PackEntry], header: bytes) -> bytes:
        table = encode_table(entries)
        return header + self.keys.meta.seal(table, b"pack table " + header) + _FOOTER2.pack(len(entries), MAGIC2)

    def verify(self, pack_id: str, tail: bytes, pack_size: int, name: str) -> tuple[list[PackEntry], bytes]:
        count = self.count(tail[-_FOOTER2.size:], pack_size, name)
        span = self.span(count)
        if len(tail) < span:
            raise IntegrityError(f"pack {name}: short read of its blob table", object=name)
        trailer = tail[len(tail) - span:]
        if pack_id_of(trailer) != pack_id:
            raise IntegrityError(f"pack {name}: its blob table does not match its name (damaged or renamed)",
                                 object=name)
        header = bytes(trailer[:PACK_HEADER_SIZE])
        table = self.keys.meta.open(trailer[PACK_HEADER_SIZE:span - _FOOTER2.size], b"pack table " + header,
                                    f"the blob table of pack {name}", name)
        if len(table) != count * ENTRY_SIZE:
            raise IntegrityError(f"pack {name}: its blob table holds {len(table)} bytes, not {count} entries",
                                 object=name)
        return decode_table(table, count, pack_size - span, name), header

    def size(self, entries: Sequence[PackEntry]) -> int:
        return pack_size(entries, self.span)


PackLayout = PlainPacks | SealedPacks
PLAIN = PlainPacks()

assert ENTRY_SIZE == ID_SIZE + 20
