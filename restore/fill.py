"""Fill one target image from a list of pieces, fetching blobs in parallel, grouped by pack.

Each worker thread owns one writer on the target (its own NBD connection) and works through range
reads: several neighbouring blobs of one pack come in one ranged GET, are decompressed and verified
against their ids (zstandard, hashlib and libnbd release the GIL), and are written at every offset that
uses them. Every blob is fetched once however many pieces refer to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import nbd

from fleece.repository import Piece, Repository
from fleece.repository.errors import IntegrityError
from fleece.repository.repo import ReadRange
from fleece.repository.workers import run_all

from .targets import Target, write_blob_piece

MAX_RANGE = 16 << 20  # one GET: enough to amortise a request, small enough to bound memory per worker
MAX_GAP = 256 << 10  # read across gaps this small between wanted blobs of a pack


@dataclass
class FillStats:
    blobs: int = 0
    fetched_bytes: int = 0  # compressed bytes read from the repository
    data_bytes: int = 0  # bytes written to the target
    zero_bytes: int = 0  # bytes of zeros skipped or written as zero clusters


def _is_zero(view: memoryview) -> bool:
    return nbd.Buffer.from_buffer(view).is_zero()


def fill(repo: Repository, target: Target, pieces: list[Piece], *, mask: bool, workers: int,
         progress: Callable[[int], None] | None = None, where: str = "") -> FillStats:
    """Write *pieces* into *target*. *mask*: the target is an overlay (zeros must hide older data)."""
    stats = FillStats()
    lock = threading.Lock()
    uses: dict[bytes, list[Piece]] = {}
    zero_pieces = []
    for p in pieces:
        if p.blob is None:
            zero_pieces.append(p)
        else:
            uses.setdefault(p.blob, []).append(p)
    try:
        ranges = repo.plan_reads(uses, MAX_RANGE, MAX_GAP)
    except IntegrityError as exc:  # the same error, said where (its object stays: scripts act on it)
        raise IntegrityError(f"{where}: {exc}", object=exc.object) from None

    def filler() -> Callable[[ReadRange], None]:
        w = target.writer()  # one connection per worker, reused for all its ranges

        def work(rng: ReadRange) -> None:
            written = zeros = 0
            try:
                for blob, plain in repo.read_blobs(rng):
                    view = memoryview(plain)
                    for p in uses[blob]:
                        wr, zr = write_blob_piece(w, view[p.skip:p.skip + p.length], p.offset, mask, _is_zero)
                        written += wr
                        zeros += zr
            except IntegrityError as exc:
                raise IntegrityError(f"{where}: {exc}", object=exc.object) from None
            with lock:
                stats.blobs += len(rng.items)
                stats.fetched_bytes += rng.end - rng.start
                stats.data_bytes += written
                stats.zero_bytes += zeros
            if progress is not None:
                progress(written + zeros)

        return work

    if zero_pieces and mask:
        w = target.writer()
        for p in zero_pieces:
            w.zero(p.length, p.offset)
    stats.zero_bytes += sum(p.length for p in zero_pieces)
    run_all(ranges, filler, workers=max(1, workers), name="fleece-restore", on_close=repo.backend.cancel)
    return stats
