"""Interval algebra over byte ranges of a disk.

A *range list* is a list of ``(offset, length)`` tuples, sorted by offset, with positive lengths, and
coalesced: no two ranges overlap or touch. Every function here takes and returns range lists in that
normal form (use :func:`normalize` on anything else) and runs in O(n + m) over its inputs — never in
O(disk size / granularity): a 2 TiB disk with a handful of dirty extents must cost a handful of steps.

Both the exporter (dirty ∩ allocated, cut at the chunk grid) and restore (newest layer wins) are built on
these few operations, so they live in one place and are property-tested against a set-of-bytes model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

Range = tuple[int, int]
RangeList = list[Range]
E = TypeVar("E", bound=tuple[Any, ...])  # a range, or a longer tuple starting (offset, length, …)


def _append_merged(out: RangeList, off: int, length: int) -> None:
    """Append a range that starts at or after the last one, merging it if they overlap or touch."""
    if out and off <= out[-1][0] + out[-1][1]:
        last_off, last_len = out[-1]
        out[-1] = (last_off, max(last_off + last_len, off + length) - last_off)
    else:
        out.append((off, length))


def normalize(ranges: Iterable[Range]) -> RangeList:
    """Sort, drop empty ranges and merge overlapping or touching ones."""
    out: RangeList = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if off < 0:
            raise ValueError(f"negative offset {off}")
        _append_merged(out, off, length)
    return out


def total(ranges: Iterable[Range]) -> int:
    """Number of bytes covered by a range list."""
    return sum(length for _, length in ranges)


def union(a: RangeList, b: RangeList) -> RangeList:
    """Bytes in *a* or in *b*."""
    out: RangeList = []
    i = j = 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and a[i][0] <= b[j][0]):
            off, length = a[i]
            i += 1
        else:
            off, length = b[j]
            j += 1
        _append_merged(out, off, length)
    return out


def intersection(a: RangeList, b: RangeList) -> RangeList:
    """Bytes in both *a* and *b*."""
    out: RangeList = []
    i = j = 0
    while i < len(a) and j < len(b):
        a_off, a_end = a[i][0], a[i][0] + a[i][1]
        b_off, b_end = b[j][0], b[j][0] + b[j][1]
        start, end = max(a_off, b_off), min(a_end, b_end)
        if start < end:
            out.append((start, end - start))
        if a_end <= b_end:
            i += 1
        else:
            j += 1
    return out


def subtract(entries: Iterable[E], b: RangeList) -> Iterator[tuple[E, int, int]]:
    """The parts of *entries* not in *b*: ``(entry, offset, length)`` per part, in order.

    *entries* are anything whose first two fields are ``(offset, length)`` — ranges, or extent-map
    entries that carry a blob id (restore's "newest layer wins" keeps the entry to know which blob, and
    where inside it, a surviving part comes from). They must be sorted by offset; one sweep over both
    inputs, O(n + m).
    """
    j = 0
    for entry in entries:
        off, length = entry[0], entry[1]
        pos, end = off, off + length
        while j < len(b) and b[j][0] + b[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(b) and b[k][0] < end:
            b_off, b_end = b[k][0], b[k][0] + b[k][1]
            if b_off > pos:
                yield entry, pos, b_off - pos
            pos = max(pos, b_end)
            k += 1
        if pos < end:
            yield entry, pos, end - pos


def difference(a: RangeList, b: RangeList) -> RangeList:
    """Bytes in *a* that are not in *b*."""
    return [(off, length) for _, off, length in subtract(a, b)]


def complement(a: RangeList, size: int) -> RangeList:
    """Bytes of ``[0, size)`` not in *a*."""
    return difference([(0, size)] if size > 0 else [], a)


def clip(a: RangeList, size: int) -> RangeList:
    """*a* restricted to ``[0, size)``."""
    return intersection(a, [(0, size)] if size > 0 else [])


def coalesce(a: RangeList, max_gap: int) -> RangeList:
    """Merge ranges separated by gaps of at most *max_gap* bytes (the gaps become covered).

    Reading a small clean gap costs less than an extra request and an extra blob.
    """
    out: RangeList = []
    for off, length in a:
        if out and off - (out[-1][0] + out[-1][1]) <= max_gap:
            out[-1] = (out[-1][0], off + length - out[-1][0])
        else:
            out.append((off, length))
    return out


def split_at_grid(a: Iterable[Range], grid: int) -> Iterator[Range]:
    """Cut every range at multiples of *grid*, so that no piece crosses a grid boundary.

    The pieces come out in order; adjacent pieces are not merged again (that is the point).
    """
    if grid <= 0:
        raise ValueError("grid must be positive")
    for off, length in a:
        end = off + length
        while off < end:
            cut = min(end, (off // grid + 1) * grid)
            yield off, cut - off
            off = cut


def align_out(a: RangeList, granule: int, size: int) -> RangeList:
    """Grow every range outwards to *granule* boundaries (clipped to *size*) and renormalize."""
    grown = ((off // granule * granule, min(size, -(-(off + length) // granule) * granule)) for off, length in a)
    return normalize((start, end - start) for start, end in grown)
