"""Resolving a chain of extent maps into one view of the disk ("newest wins").

Given a disk's layers from the requested point back to its full, every byte is taken from the newest
layer that lists it; bytes no layer lists read as zero (a full's unlisted ranges are zero). A newer
entry may cover part of an older blob, so resolved entries carry ``skip``: where inside the blob's
plaintext the range starts.

The sweep is O(total entries · log) and never touches the disk size, so a long chain of small
incrementals over a huge disk resolves in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import extents as ex
from .manifest import Extent


@dataclass(frozen=True, slots=True)
class Piece:
    """A resolved range: *length* bytes at *offset* come from *blob* at *skip* (None = zeros)."""

    offset: int
    length: int
    blob: bytes | None
    skip: int = 0


def resolve(layers: Sequence[list[Extent]], skips: Sequence[Mapping[int, int]] | None = None) -> list[Piece]:
    """Merge extent maps given newest first; the last layer must be a full. Result sorted by offset.

    *skips* (one mapping per layer, as :attr:`~.manifest.DiskRecord.skips`) say where a merged layer's
    entries start inside their blobs. ZERO entries are kept (as pieces with ``blob=None``) because a
    writer into a non-empty target needs them; a writer into a fresh, zero-filled image may skip them.
    """
    covered: ex.RangeList = []
    out: list[Piece] = []
    for i, entries in enumerate(layers):
        ordered = sorted(entries)
        base = skips[i] if skips else {}
        # the parts of this layer no newer layer covers; skip = where the part starts inside the blob
        out.extend(Piece(pos, length, blob, pos - off + base.get(off, 0))
                   for (off, _, blob), pos, length in ex.subtract(ordered, covered))
        covered = ex.union(covered, ex.normalize((off, length) for off, length, _ in ordered))
    out.sort(key=lambda p: p.offset)
    return out
