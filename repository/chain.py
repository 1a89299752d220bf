"""Resolving a chain of extent maps into one view of the disk ("newest wins").

Given a disk's layers from the requested point back to its full, every byte is taken from the newest
layer that lists it; bytes no layer lists read as zero (a full's unlisted ranges are zero). A newer
entry may cover part of an older blob, so resolved entries carry ``skip``: where inside the blob's
plaintext the range starts.

The sweep is O(total entries · log) and never touches the disk size, so a long chain of small
incrementals over a huge disk resolves in milliseconds.
"""

from __future__ import annotations

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


def _uncovered(entries: list[Extent], covered: ex.RangeList) -> list[Piece]:
    """The parts of *entries* not in *covered* (both sorted), as pieces."""
    out: list[Piece] = []
    j = 0
    for off, length, blob in entries:
        pos, end = off, off + length
        while j < len(covered) and covered[j][0] + covered[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(covered) and covered[k][0] < end:
            c_off, c_end = covered[k][0], covered[k][0] + covered[k][1]
            if c_off > pos:
                out.append(Piece(pos, c_off - pos, blob, pos - off))
            pos = max(pos, c_end)
            k += 1
        if pos < end:
            out.append(Piece(pos, end - pos, blob, pos - off))
    return out


def resolve(layers: list[list[Extent]]) -> list[Piece]:
    """Merge extent maps given newest first; the last layer must be a full. Result sorted by offset.

    ZERO entries are kept (as pieces with ``blob=None``) because a writer into a non-empty target needs
    them; a writer into a fresh, zero-filled image may skip them.
    """
    covered: ex.RangeList = []
    out: list[Piece] = []
    for entries in layers:
        ordered = sorted(entries)
        out.extend(_uncovered(ordered, covered))
        covered = ex.union(covered, ex.normalize((off, length) for off, length, _ in ordered))
    out.sort(key=lambda p: p.offset)
    return out
