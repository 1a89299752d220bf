"""Blob encoding: content id, compression and its inverse with verification.

A blob's id is a hash of its plaintext — SHA-256 in format 1, HMAC-SHA256 under the repository's key in
format 2 (``Envelope.blob_id``) — so identical disk bytes are stored once, whichever VM or point they
come from, and every read can be checked against the id it was asked for.

zstandard's compressor objects are not thread-safe, but they release the GIL, as does hashlib; the writer
therefore runs one :class:`Codec` per worker thread (FIELD-NOTES §8: one compressor per thread beats
libzstd's own threads on 4 MiB chunks).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from .errors import IntegrityError

ID_SIZE = 32

# Blob encodings, as stored in a pack's blob table ("kind").
ENCODING_RAW = 0  # stored as is: compression would not have saved anything
ENCODING_ZSTD = 1  # one zstd frame with the content size in its header


def blob_id(data: bytes | bytearray | memoryview) -> bytes:
    """Content id of a blob's plaintext in format 1."""
    return hashlib.sha256(data).digest()


#: how a repository names blobs: :func:`blob_id`, or a keyed HMAC in format 2
BlobIdentity = Callable[[bytes | bytearray | memoryview], bytes]


@dataclass(frozen=True)
class Encoded:
    """One encoded blob, ready to be appended to a pack."""

    id: bytes
    payload: bytes | bytearray | memoryview
    raw_length: int
    encoding: int


class Codec:
    """Hashes, compresses and decompresses blobs; one instance per thread."""

    def __init__(self, level: int = 3, ident: BlobIdentity = blob_id) -> None:
        self.level = level
        self.ident = ident
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, data: bytes | bytearray | memoryview, known_id: bytes | None = None) -> Encoded:
        """Compress *data*; keep it raw when zstd cannot shrink it (random or encrypted guest data)."""
        ident = known_id if known_id is not None else self.ident(data)
        packed = self._compressor.compress(data)
        if len(packed) >= len(data):
            return Encoded(ident, data, len(data), ENCODING_RAW)  # no copy: the pack copies it
        return Encoded(ident, packed, len(data), ENCODING_ZSTD)

    def decode(self, payload: bytes | memoryview, raw_length: int, encoding: int, expected_id: bytes,
               where: str) -> bytes:
        """Return the plaintext of a stored blob, verified against *expected_id*.

        *where* names the blob's location (pack and offset) for the error message: an integrity failure
        must tell the user which object is damaged.
        """
        if encoding == ENCODING_RAW:
            data = bytes(payload)
        elif encoding == ENCODING_ZSTD:
            try:
                data = self._decompressor.decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise _undecompressable(expected_id, where, exc) from None
        else:
            raise _unknown_encoding(expected_id, where, encoding)
        if len(data) != raw_length or self.ident(data) != expected_id:
            raise _mismatch(expected_id, where)
        return data

    def decode_into(self, payload: bytes | memoryview, out: memoryview, raw_length: int, encoding: int,
                    expected_id: bytes, where: str) -> None:
        """:meth:`decode` into ``out[:raw_length]`` — a caller's reused buffer (restore: page-aligned,
        pooled), so that no fresh 4 MiB object is faulted in per blob. The same checks, the same errors."""
        if raw_length > len(out):
            raise IntegrityError(f"blob {expected_id.hex()} in {where} claims {raw_length} bytes, more than a blob "
                                 "of this repository holds (damaged index); run 'fleece verify --read-data'")
        if encoding == ENCODING_RAW:
            if len(payload) != raw_length:
                raise _mismatch(expected_id, where)
            out[:raw_length] = payload
        elif encoding == ENCODING_ZSTD:
            got = 0
            try:
                reader = self._decompressor.stream_reader(payload, read_size=max(1, len(payload)),
                                                          read_across_frames=False)
                while got < raw_length:
                    n = reader.readinto(out[got:raw_length])
                    if not n:
                        break
                    got += n
                longer = reader.read(1)
            except zstandard.ZstdError as exc:
                raise _undecompressable(expected_id, where, exc) from None
            if got != raw_length or longer:
                raise _mismatch(expected_id, where)
        else:
            raise _unknown_encoding(expected_id, where, encoding)
        if self.ident(out[:raw_length]) != expected_id:
            raise _mismatch(expected_id, where)


def _mismatch(blob: bytes, where: str) -> IntegrityError:
    return IntegrityError(f"blob {blob.hex()} in {where} does not match its id "
                          "(damaged pack or index); run 'fleece verify --read-data'")


def _undecompressable(blob: bytes, where: str, exc: Exception) -> IntegrityError:
    return IntegrityError(f"blob {blob.hex()} in {where} does not decompress ({exc}); "
                          "the pack is damaged: run 'fleece verify --read-data'")


def _unknown_encoding(blob: bytes, where: str, encoding: int) -> IntegrityError:
    return IntegrityError(f"blob {blob.hex()} in {where} has unknown encoding {encoding}; "
                          "was it written by a newer fleece?")


class CodecPool:
    """Hands each thread its own :class:`Codec` (zstd contexts are not thread-safe)."""

    def __init__(self, level: int, ident: BlobIdentity = blob_id) -> None:
        self.level = level
        self.ident = ident
        self._local = threading.local()

    def get(self) -> Codec:
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = Codec(self.level, self.ident)
        return codec
