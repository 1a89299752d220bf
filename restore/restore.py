"""Restore a point in time from the repository alone — no QEMU of the source, no local state (DESIGN §7).

Chain mode (default) rebuilds, per disk, one qcow2 per point from the full up to the requested point:
the full is the base, each incremental an overlay whose backing file is the previous layer by a
*relative* name, so the directory can be moved or copied as a whole. ``DIR/<disk>.qcow2`` is an empty
overlay on top of the chain: boot from it and the restored layers stay pristine. (A symlink cannot do
this job: QEMU resolves relative backing names against the path it opened.)

Flat mode resolves the chain's extent maps (newest wins) and writes every byte once into one thin qcow2
or sparse raw image.

A point restores the whole VM as of that point (:meth:`Repository.point_view`): every disk that appears
in any point of the VM up to and including it, each at the newest layer up to that point — a ``--disk``
backup of some disks leaves the others' layers in older points, and they are restored from there (the
log, and each disk's ``point`` in the result, say which point). A disk removed from the VM is restored
too, at its last layer, since the manifests cannot tell it from a disk left out by ``--disk``.
``disks`` narrows the restore to the disks named.

Images are built under temporary names — every disk's — and renamed into place only when all are
complete: a failed restore never leaves an image under a final name. Fresh images (a flat image, a
chain's base) are written directly (:mod:`.direct`), overlays through qemu-nbd (:mod:`.targets`).

An interrupted restore (Ctrl-C, SIGTERM, the storage gone after its retries; also SIGKILL) keeps its
partial images (``DIR/.<disk>.partial/``, ``DIR/.<disk>.<format>.partial``) and their journals
(``DIR/.<disk>.resume``, :mod:`.journal`): ``resume`` continues them, skipping what is durable already.
Any other failure removes them, and a restore without ``resume`` removes a previous one's leftovers
before it starts. A restore killed outright also leaves its run directory in ``$TMPDIR``, which the next
restore anywhere removes (:mod:`fleece.repository.rundir`). A failed or interrupted restore removes the
``--out`` directories it made when they are empty again. ``verify_only`` runs the whole restore into
nothing (:func:`verify_restore`).

Before any work (:mod:`.guard`): ``--out`` must be a directory this user can write, or be creatable;
and no file restore would replace or write into may be open in a running QEMU — not even with
``force``: replacing an image a VM has open loses every write the guest makes afterwards. That is
checked again just before each disk's images are replaced (a restore can take hours).

Restored images hold what the guest held, secrets included, so they are private unless the caller says
otherwise (``RestoreRequest.mode``, ``fleece restore --mode``): every file restore makes is ``0600`` and
every directory it makes (``DIR/<disk>/``, ``--out`` itself and its parents when missing) ``0700``, from
the moment it exists, whatever the umask (see :mod:`.targets`). With a mode such as ``0640`` files get
exactly that and directories the same bits plus search where read is granted (``0750``). An existing
``--out`` directory is never changed. Its group is *not* honoured on its own: in a setgid ``--out`` the
kernel gives new files and directories that group (and new directories the setgid bit), but the group
gets no permission unless the mode grants it — one rule everywhere, and sharing images is a decision the
user states (``--mode 0640``), not one inferred from how a directory happens to be set up.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece.repository import Manifest, Piece, Repository, rundir
from fleece.repository.errors import FleeceError, IntegrityError, Interrupted, TransientBackendError, UsageError
from fleece.repository.index import Location

from .direct import PreallocatedQcow2, RawTarget
from .fill import FillStats, NullTarget, fill
from . import journal as journal_mod
from .journal import Journal
from .guard import check_out, refuse_in_use
from .targets import (FILE_MODE, QemuNbdTarget, RestoreError, create_qcow2, dir_mode, make_dir, make_dirs,
                      remove_empty_dirs, repair_leaks)

log = logging.getLogger(__name__)

#: name prefix of a restore's run directory in $TMPDIR (qemu-nbd sockets and logs)
RUN_PREFIX = "fleece-restore-"
#: a fresh qcow2 (a flat image, a chain's base) is written directly into preallocated metadata when its
#: data is at least this fraction of its virtual size (see :func:`direct_worthwhile`)
DIRECT_MIN_DENSITY = 1 / 128


@dataclass
class RestoreRequest:
    vm: str
    out: Path
    point: str | None = None
    disks: list[str] | None = None
    flat: bool = False
    format: str = "qcow2"
    workers: int = 4
    force: bool = False
    progress: Callable[[int], None] | None = None
    mode: int | None = None  # of the image files; None: 0600 (directories: see dir_mode), see the module doc
    #: decode and check what the restore would write, write nothing (``out`` unused): :func:`verify_restore`
    verify_only: bool = False
    #: continue an interrupted restore into the same ``out`` (:mod:`.journal`) instead of starting over
    resume: bool = False


def check_mode(mode: int) -> int:
    """A file mode restore can use: permission bits only, read-write for the owner, nothing executable."""
    if not 0 <= mode <= 0o777:
        raise UsageError(f"mode {mode:#o} is not a file mode: give permission bits, e.g. --mode 0640")
    if mode & 0o600 != 0o600:
        raise UsageError(f"mode {mode:04o} does not let the owner read and write the images it restores; "
                         "use e.g. 0600 or 0640")
    if mode & 0o111:
        raise UsageError(f"mode {mode:04o} makes disk images executable; drop the x bits (directories get "
                         "search permission wherever the mode grants read), e.g. 0640")
    return mode


def _file_mode(req: RestoreRequest) -> int:
    return FILE_MODE if req.mode is None else req.mode


@dataclass
class DiskRestore:
    disk: str
    path: Path | None  # what to boot / convert: DIR/<disk>.qcow2 (or .raw); None: --verify-only
    layers: list[Path] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    point: str = ""  # the point holding this disk's newest layer up to the requested point


@dataclass
class RestoreResult:
    point: Manifest
    disks: list[DiskRestore]
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """MB (10^6 bytes) of blobs decoded and checked per second of the whole restore."""
        plain = sum(d.stats.get("plain_bytes", 0) for d in self.disks)
        return round(plain / 1e6 / self.seconds, 1) if self.seconds > 0 else 0.0


def run_restore(repo: Repository, req: RestoreRequest) -> RestoreResult:
    if req.format not in ("qcow2", "raw"):
        raise UsageError(f"unknown format {req.format!r}: use qcow2 or raw")
    if req.format == "raw" and not req.flat:
        raise UsageError("--format raw needs --flat (a chain is made of qcow2 overlays)")
    if req.mode is not None:
        check_mode(req.mode)
    if not req.verify_only:
        check_out(req.out)
    repo.envelope.require_read("restore")  # a write-only key: said before any image is made
    started = time.monotonic()
    manifest, view, disks = _selection(repo, req)
    if req.verify_only:
        return verify_restore(repo, req, manifest, view, disks, started)
    refuse_in_use(p for d in disks for p in _replaced(req, d))
    for d in disks:
        _check_free(req, d)
    made = make_dirs(req.out, dir_mode(_file_mode(req)))
    run_dir: Path | None = None
    results: list[DiskRestore] = []
    installed: list[str] = []
    try:
        run_dir = rundir.make_run_dir(Path(tempfile.gettempdir()), RUN_PREFIX)
        for d in disks:
            results.append((_flat if req.flat else _chain)(repo, req, view[d], d, run_dir))
        for done in results:
            _install(req, done, view[done.disk])
            installed.append(done.disk)
    except BaseException as exc:
        # All or nothing: a VM restored up to its third disk must not pass for a restored VM (and the
        # retry must not trip over "already exists"). An interruption keeps the partial images and their
        # journals for `--resume`; any other failure removes them.
        keep = isinstance(exc, RESUMABLE) and not installed
        for d in installed:
            for path in _outputs(req, d):
                _remove(path)
        if keep:
            log.warning("restore interrupted: what it wrote is kept in %s (hidden .partial files); run the same "
                        "restore with --resume to continue, without it to start over", req.out)
        else:
            for d in disks:
                for path in [*_partials(req, d), req.out / f".{d}.resume"]:
                    _remove(path)
        remove_empty_dirs(made)
        raise
    finally:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return RestoreResult(manifest, results, round(time.monotonic() - started, 3))


def select_disks(repo: Repository, vm: str, point: str | None,
                 wanted: list[str] | None) -> tuple[Manifest, dict[str, Manifest], list[str]]:
    """The point (``None``/``latest``: the newest), its view (disk → the point holding its newest layer,
    :meth:`Repository.point_view`) and the disks asked for (all of the view's without *wanted*) — a disk
    the VM did not have then is a :class:`UsageError` listing the ones it had. Restore, serve and live
    restore choose their disks the same way."""
    manifest = repo.find_point(vm, point)
    view = repo.point_view(manifest, wanted)
    disks = list(dict.fromkeys(wanted)) if wanted else sorted(view)
    missing = [d for d in disks if d not in view]
    if missing:
        raise UsageError(f"VM {manifest.vm} had no disk {', '.join(missing)} as of point {manifest.id}; it had: "
                         f"{', '.join(sorted(repo.point_view(manifest)))}")
    return manifest, view, disks


def _selection(repo: Repository, req: RestoreRequest) -> tuple[Manifest, dict[str, Manifest], list[str]]:
    """The point, its view (disk → the point holding its newest layer) and the disks to restore."""
    manifest, view, disks = select_disks(repo, req.vm, req.point, req.disks)
    for d in disks:
        if view[d] is not manifest:
            log.info("disk %s: not in point %s (a --disk backup of other disks, or the disk left the VM); "
                     "restoring its newest layer up to it, from point %s", d, manifest.id, view[d].id)
    return manifest, view, disks


def verify_restore(repo: Repository, req: RestoreRequest, manifest: Manifest, view: dict[str, Manifest],
                   disks: list[str], started: float) -> RestoreResult:
    """``restore --verify-only``: every blob the restore would write (the flat view with ``flat``, every
    layer of the chain without) read, decoded and checked by the restore's own pipeline, nothing written —
    so its time is the restore's minus the writing. A damaged blob is the restore's error."""
    results = []
    for d in disks:
        chain = repo.disk_chain(view[d], d)
        hints = chain_hints(chain)
        layers = [view[d]] if req.flat else list(reversed(chain))
        located = None if req.flat else _chain_locations(repo, chain, d, hints)
        total = FillStats()
        for point in layers:
            pieces = repo.resolve(point, d) if req.flat else _layer_pieces(point.disks[d])
            total.add(fill(repo, NullTarget(), pieces, mask=False, workers=req.workers, progress=req.progress,
                           where=f"restore of VM {manifest.vm} point {point.id} disk {d}", hints=hints,
                           located=located))
        results.append(DiskRestore(d, None, [], total.__dict__, view[d].id))
    return RestoreResult(manifest, results, round(time.monotonic() - started, 3))


def _layer_pieces(rec: Any) -> list[Piece]:
    """What one layer's own image holds: its extents, each with the part of its blob it takes."""
    return [Piece(off, length, blob, rec.skips.get(off, 0)) for off, length, blob in rec.extents]


def chain_hints(chain: list[Manifest]) -> list[str]:
    """The index objects of the runs that wrote *chain*'s layers (``Manifest.index_hints``, newest
    first): where a restore looks its blobs up, so that it never loads the repository's whole index —
    its memory and time follow the point, not the repository (``Repository.locate_many``)."""
    return list(dict.fromkeys(h for m in chain for h in m.index_hints))


def _chain_locations(repo: Repository, chain: list[Manifest], disk: str,
                     hints: list[str]) -> dict[bytes, Location] | None:
    """Where the blobs of every layer of *disk* in *chain* are, looked up once for the chain: once a
    prune has consolidated the index, the hints are gone and each layer's own lookup would read every
    index object again. ``None`` when that fails (a blob no index object has, a damaged one): each
    layer's fill then looks its own blobs up, and its error names the layer."""
    blobs = list(dict.fromkeys(b for m in chain for _, _, b in m.disks[disk].extents if b is not None))
    try:
        return repo.locate_many(blobs, hints)
    except IntegrityError:
        return None


def _outputs(req: RestoreRequest, disk: str) -> list[Path]:
    if req.flat:
        return [req.out / f"{disk}.{req.format}"]
    return [req.out / f"{disk}.qcow2", req.out / disk]


#: failures after which a restore keeps what it wrote, for ``--resume``: an interruption by the user or
#: the storage going away — not damage, a refusal or a bad target, which a second try would meet again
RESUMABLE = (KeyboardInterrupt, Interrupted, TransientBackendError)


def _partials(req: RestoreRequest, disk: str) -> list[Path]:
    """Every temporary name a restore of *disk* builds under, in either mode: all of them are this
    restore's to clear (a killed chain restore's ``.vda.partial`` must not outlive a later flat one)."""
    return [req.out / f".{disk}.partial", req.out / f".{disk}.qcow2.partial", req.out / f".{disk}.raw.partial"]


def _replaced(req: RestoreRequest, disk: str) -> list[Path]:
    """What restoring *disk* removes, replaces or writes into."""
    return [*_outputs(req, disk), *_partials(req, disk)]


def _check_free(req: RestoreRequest, disk: str) -> None:
    existing = [p for p in _outputs(req, disk) if p.exists() or p.is_symlink()]
    if existing and not req.force:
        raise UsageError(f"{existing[0]} already exists; restore into another --out directory or pass --force "
                         "to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def direct_worthwhile(data_bytes: int, virtual_size: int) -> bool:
    """Whether a fresh qcow2 is best written directly (:class:`~.direct.PreallocatedQcow2`) rather than
    through qemu-nbd. Measured here: the direct path saves ~1 ns per data byte (the socket and qemu-nbd's
    single thread: 4.5 s → 2.5 s for 1.9 GB), while preallocating metadata costs ~6.4 ps per *virtual*
    byte (create, map and check of a 1 TiB image: 7 s) — break-even near 0.6 % of the disk holding data.
    A 1 TiB disk with a few GiB of data is therefore served by qemu-nbd, a used one written directly."""
    return data_bytes >= virtual_size * DIRECT_MIN_DENSITY


def _fresh_qcow2(path: Path, size: int, options: dict[str, Any], pieces: list[Piece], mode: int,
                 run_dir: Path, workers: int) -> Any:
    """The target of an image that starts empty: written directly when that pays, else via qemu-nbd."""
    data = sum(p.length for p in pieces if p.blob is not None)
    if direct_worthwhile(data, size):
        return PreallocatedQcow2(path, size, options, mode)
    create_qcow2(path, size, options, mode=mode)
    return QemuNbdTarget(path, run_dir, workers)


def _journal(repo: Repository, req: RestoreRequest, manifest: Manifest, disk: str) -> tuple[Journal, bool]:
    """This disk's resume journal: continued with ``--resume`` if it is this very restore's."""
    header = {"repository": repo.config.id, "vm": manifest.vm, "point": manifest.id, "disk": disk,
              "mode": "flat" if req.flat else "chain", "format": req.format}
    return Journal.start(req.out / f".{disk}.resume", header, req.resume, _file_mode(req))


def _layer(repo: Repository, req: RestoreRequest, journal: Journal, layer: str, image: Path, pieces: list[Piece],
           make: Callable[[], Any], reopen: Callable[[], Any], mask: bool, where: str, hints: list[str],
           located: dict[bytes, Location] | None = None) -> FillStats:
    """Write one image (a layer, or a flat image) through the journal: skipped when it is complete, its
    durable ranges skipped when it can be reopened, made anew otherwise. *hints*, *located*: where its
    blobs are (:func:`chain_hints`, :func:`_chain_locations`)."""
    if journal.complete(layer) and image.exists():
        log.info("%s: complete already (resumed)", image.name)
        resumed = sum(p.length for p in pieces if p.blob is not None)
        if req.progress is not None:
            req.progress(resumed)
        return FillStats(resumed_bytes=resumed)
    target = None
    try:  # one try from the moment a target exists: an interruption anywhere after it still closes it
        if req.resume and image.exists() and journal.done(layer):
            try:
                target = reopen()
                log.info("%s: resuming, %d range read(s) written already", image.name, len(journal.done(layer)))
            except RestoreError as exc:
                log.warning("%s cannot be continued (%s): making it anew", image, exc)
        if target is None:
            journal.reset(layer)
            _remove(image)
            target = make()
        stats = fill(repo, target, pieces, mask=mask, workers=req.workers, progress=req.progress, where=where,
                     skip=journal.done(layer), checkpoint=lambda keys: journal.record(layer, keys),
                     checkpoint_bytes=journal_mod.CHECKPOINT_BYTES, hints=hints, located=located)
    finally:
        if target is not None:
            target.close()
    journal.finish(layer)
    return stats


def _chain(repo: Repository, req: RestoreRequest, manifest: Manifest, disk: str, run_dir: Path) -> DiskRestore:
    """Build *disk*'s chain in ``DIR/.<disk>.partial/`` (installed by :func:`_install`)."""
    chain = repo.disk_chain(manifest, disk)
    layers = list(reversed(chain))  # the full first
    partial = req.out / f".{disk}.partial"
    journal, resumed = _journal(repo, req, manifest, disk)
    for p in _partials(req, disk):
        if not (resumed and p == partial):
            _remove(p)
    if not partial.is_dir():
        _remove(partial)
        make_dir(partial, dir_mode(_file_mode(req)))
    hints = chain_hints(chain)
    located = _chain_locations(repo, chain, disk, hints)
    total = FillStats()
    for i, point in enumerate(layers):
        rec = point.disks[disk]
        image = partial / f"{point.id}.qcow2"
        pieces = _layer_pieces(rec)
        if i == 0:
            def make(image: Path = image, rec: Any = rec, pieces: list[Piece] = pieces) -> Any:
                return _fresh_qcow2(image, rec.virtual_size, rec.qcow2, pieces, _file_mode(req), run_dir, req.workers)

            def reopen(image: Path = image, rec: Any = rec, pieces: list[Piece] = pieces) -> Any:
                return _reopen_qcow2(image, rec.virtual_size, pieces, run_dir, req.workers)
        else:  # an overlay: only QEMU knows how to leave the rest of it to its backing file
            def make(image: Path = image, rec: Any = rec, i: int = i) -> Any:
                create_qcow2(image, rec.virtual_size, rec.qcow2, backing=f"{layers[i - 1].id}.qcow2",
                             mode=_file_mode(req))
                return QemuNbdTarget(image, run_dir, req.workers)

            def reopen(image: Path = image) -> Any:
                return _reopen_nbd(image, run_dir, req.workers)
        total.add(_layer(repo, req, journal, point.id, image, pieces, make, reopen, mask=i > 0,
                         where=f"restore of VM {manifest.vm} point {point.id} disk {disk}", hints=hints,
                         located=located))
    log.info("disk %s: restored a chain of %d layer(s)", disk, len(layers))
    return DiskRestore(disk, req.out / f"{disk}.qcow2", [req.out / disk / f"{p.id}.qcow2" for p in layers],
                       total.__dict__, manifest.id)


def _flat(repo: Repository, req: RestoreRequest, manifest: Manifest, disk: str, run_dir: Path) -> DiskRestore:
    """Build *disk*'s flat image as ``DIR/.<disk>.<format>.partial`` (installed by :func:`_install`)."""
    rec = manifest.disks[disk]
    pieces = repo.resolve(manifest, disk)
    partial = req.out / f".{disk}.{req.format}.partial"
    journal, resumed = _journal(repo, req, manifest, disk)
    for p in _partials(req, disk):
        if not (resumed and p == partial):
            _remove(p)
    if req.format == "raw":
        def make() -> Any:
            return RawTarget(partial, rec.virtual_size, _file_mode(req))

        def reopen() -> Any:
            return RawTarget.reopen(partial, rec.virtual_size)
    else:
        def make() -> Any:
            return _fresh_qcow2(partial, rec.virtual_size, rec.qcow2, pieces, _file_mode(req), run_dir, req.workers)

        def reopen() -> Any:
            return _reopen_qcow2(partial, rec.virtual_size, pieces, run_dir, req.workers)
    stats = _layer(repo, req, journal, manifest.id, partial, pieces, make, reopen, mask=False,
                   where=f"restore of VM {manifest.vm} point {manifest.id} disk {disk}",
                   hints=chain_hints(repo.disk_chain(manifest, disk)))
    final = req.out / f"{disk}.{req.format}"
    return DiskRestore(disk, final, [final], stats.__dict__, manifest.id)


def _reopen_qcow2(path: Path, size: int, pieces: list[Piece], run_dir: Path, workers: int) -> Any:
    """The target of an interrupted fresh qcow2, as :func:`_fresh_qcow2` chose it."""
    if direct_worthwhile(sum(p.length for p in pieces if p.blob is not None), size):
        return PreallocatedQcow2.reopen(path, size)
    return _reopen_nbd(path, run_dir, workers)


def _reopen_nbd(path: Path, run_dir: Path, workers: int) -> QemuNbdTarget:
    """An interrupted image that qemu-nbd wrote: consistent (its killed qemu-nbd may have leaked clusters,
    which are freed; anything worse and it is made anew), then served again."""
    repair_leaks(path)
    return QemuNbdTarget(path, run_dir, workers)


def _install(req: RestoreRequest, done: DiskRestore, manifest: Manifest) -> None:
    """Move one built disk into place: the final names appear only now, all disks built. *manifest*:
    the point of the disk's newest layer (the chain's top overlay is made like it)."""
    disk = done.disk
    refuse_in_use(_outputs(req, disk))  # a VM may have started on them while the disks were fetched
    for p in _outputs(req, disk):
        _remove(p)
    if req.flat:
        (req.out / f".{disk}.{req.format}.partial").rename(req.out / f"{disk}.{req.format}")
    else:
        (req.out / f".{disk}.partial").rename(req.out / disk)
        rec = manifest.disks[disk]
        create_qcow2(req.out / f"{disk}.qcow2", rec.virtual_size, rec.qcow2, backing=f"{disk}/{manifest.id}.qcow2",
                     mode=_file_mode(req))
    (req.out / f".{disk}.resume").unlink(missing_ok=True)


def restore_total(repo: Repository, vm: str, point: str | None, disks: list[str] | None, flat: bool) -> int | None:
    """The bytes the restore's progress counts, known before it starts: every data extent of every layer
    of every disk restored (chain), or of each disk's resolved view (flat). ``None`` when the point cannot
    be resolved — run_restore then says why."""
    try:
        manifest = repo.find_point(vm, point)
        view = repo.point_view(manifest, disks)
        total = 0
        for disk in dict.fromkeys(disks) if disks else view:
            if disk not in view:
                return None
            if flat:
                total += sum(p.length for p in repo.resolve(view[disk], disk) if p.blob is not None)
            else:
                total += sum(n for layer in repo.disk_chain(view[disk], disk)
                             for _, n, blob in layer.disks[disk].extents if blob is not None)
        return total
    except FleeceError:
        return None


__all__ = ["RestoreError", "RestoreRequest", "RestoreResult", "check_mode", "restore_total", "run_restore"]
