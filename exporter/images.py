"""Which shut-off VM and which disk ids the images of ``fleece backup --image [ID=]PATH`` are.

A VM that is off at night must stay incremental: its images carry the persistent dirty bitmaps its last
running backup left (QEMU stores them in the qcow2 at shutdown), and those bitmaps are named for the disk
ids of the VM's history (``vda``, ``sda``, ...). An image file says nothing of either, so they come from the
repository: every point records, per disk id, the image files of that disk's chain on its host
(``extra.machine.images``, see identity.py). An image whose path is the top of a disk's chain in the
newest point of a VM on this host *is* that disk of that VM.

Resolution, per image, first rule that applies:

* ``ID=PATH`` names the id; ``--vm`` names the VM;
* otherwise the VM's history (``--vm`` given: that VM's; not given: every VM's newest point on this host —
  exactly one VM must claim the images, two make it ambiguous and ``--vm`` must say);
* otherwise the file's stem (``web1.qcow2`` → VM ``web1``, disk ``web1``), logged, so a first backup of an
  image that was never backed up running needs no flags.

Formats are probed with ``qemu-img info -U`` (``-U``: no lock taken, so probing never disturbs a VM that
holds the image; whether another process holds it is qemu-storage-daemon's lock to find out), unless
``--image-format`` pins them. Probing is what QEMU warns about: a guest that owns a *raw* disk can write a
qcow2 header into it, and a probe then opens it as qcow2 — with a backing file of the guest's choosing,
read from the host. So an image the VM's history recorded as raw that now probes as qcow2 is refused
(``--image-format`` says which it really is).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fleece.repository import Repository
from fleece.repository.errors import FleeceError, UsageError
from fleece.repository.manifest import check_vm_name

from .identity import Machine

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
#: Formats a shut-off image may have: qcow2 keeps bitmaps (incrementals), raw is a full every time.
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class ImageSpec:
    """One ``--image`` argument as given."""

    path: str
    id: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """``ID=PATH`` or ``PATH``; a path may contain ``=`` itself (``a=b/c.qcow2`` is a path: ids have no ``/``)."""
        if not text:
            raise UsageError("--image is empty: pass the path of a shut-off VM's disk image ([ID=]PATH)")
        head, sep, tail = text.partition("=")
        if sep and tail and _ID.match(head):
            return cls(path=tail, id=head)
        return cls(path=text)


@dataclass(frozen=True)
class Image:
    """A resolved image: the disk id it is backed up as, its real path and probed format."""

    id: str
    path: str
    format: str
    virtual_size: int


def probe(path: str, fmt: str | None = None) -> tuple[str, str, int]:
    """(real path, format, virtual size) of *path* (read as *fmt* if given), or a one-line :class:`UsageError`."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--image {path}: no such file", object=path)
    if p.is_dir():
        raise UsageError(f"--image {path} is a directory: pass the disk image file", object=path)
    real = os.path.realpath(p)
    try:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", *(["-f", fmt] if fmt else []), real],
                             check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError("qemu-img not found: install qemu-utils (tools/setup does)") from None
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr.strip().splitlines() or ["qemu-img info failed"])[-1]
        raise UsageError(f"--image {path} cannot be opened as a disk image: {why}", object=path) from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"--image {path}: qemu-img info did not answer within 60 s", object=path) from None
    info = json.loads(out.stdout)
    fmt = fmt or info.get("format", "")
    if fmt not in FORMATS:
        raise UsageError(f"--image {path} is a {fmt or 'unknown'} image; fleece backs up shut-off qcow2 and raw "
                         "images (convert it with qemu-img convert -O qcow2)", object=path)
    return real, fmt, int(info.get("virtual-size", 0))


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".qcow2", ".raw", ".img"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[:-len(suffix)]
            break
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "disk"
    return slug if slug[0].isalpha() else f"disk-{slug}"


def _claims(repo: Repository, vm: str, host: str, paths: set[str]) -> dict[str, str]:
    """``{real path: disk id}`` for the *paths* that are a disk's top image in *vm*'s newest point on *host*."""
    try:
        latest = repo.latest(vm)
    except FleeceError as exc:  # one damaged history must not stop a backup of another VM's images
        log.debug("VM %s: newest point unreadable (%s)", vm, exc)
        return {}
    machine = Machine.from_json(latest.extra.get("machine")) if latest is not None else None
    if machine is None or machine.host != host:
        return {}
    return {files[0]: disk for disk, files in machine.images.items() if files and files[0] in paths}


def resolve(repo: Repository, specs: list[ImageSpec], vm: str | None,
            fmt: str | None = None) -> tuple[str, list[Image]]:
    """The VM name and the images, ids assigned (see the module docstring); *fmt* pins every image's format."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--image-format {fmt}: one of {', '.join(FORMATS)}")
    probed = [(spec, *probe(spec.path, fmt)) for spec in specs]
    reals = [real for _, real, _, _ in probed]
    twice = sorted({r for r in reals if reals.count(r) > 1})
    if twice:
        raise UsageError(f"--image {twice[0]} is given twice (each disk image once)", object=twice[0])
    host = socket.gethostname()
    wanted = set(reals)
    claims: dict[str, str] = {}
    if vm is not None:
        claims = _claims(repo, vm, host, wanted)
    else:
        owners: dict[str, dict[str, str]] = {}
        for name in repo.vms():
            found = _claims(repo, name, host, wanted)
            if found:
                owners[name] = found
        if len(owners) > 1:
            raise UsageError(f"the images belong to the histories of VMs {', '.join(sorted(owners))} in this "
                             "repository: pass --vm NAME to say which one this backup continues")
        if owners:
            vm, claims = next(iter(owners.items()))
            log.info("images %s: VM %s, whose last point recorded them", ", ".join(sorted(claims)), vm)
    if vm is None:
        vm = _stem(reals[0])
        log.info("VM name %s (from the image's file name; pass --vm NAME to choose another)", vm)
    check_vm_name(vm)
    images: list[Image] = []
    taken: set[str] = set()
    for spec, real, image_fmt, size in probed:
        disk = spec.id or claims.get(real)
        if disk is None:
            disk = _stem(real)
            while disk in taken:
                disk = f"{disk}-{len(taken)}"
            log.info("image %s: disk id %s (from its file name; pass --image ID=PATH to choose another)", real, disk)
        if disk in taken:
            raise UsageError(f"disk id {disk} is given to two images: name each with --image ID=PATH", object=disk)
        taken.add(disk)
        if fmt is None and image_fmt == "qcow2" and _recorded_raw(repo, vm, disk):
            raise UsageError(f"--image {real} probes as qcow2, but the history of VM {vm} recorded disk {disk} as a "
                             "raw image: a guest can write a qcow2 header into a raw disk. Pass --image-format raw "
                             "(or --image-format qcow2 if the image really was converted)", object=real)
        images.append(Image(id=disk, path=real, format=image_fmt, virtual_size=size))
    return vm, images


def _recorded_raw(repo: Repository, vm: str, disk: str) -> bool:
    """Whether *vm*'s newest point holding *disk* recorded it as a raw image (no qcow2 creation options:
    every qcow2 disk records at least its cluster size)."""
    try:
        layer = repo.latest_layers(vm, [disk]).get(disk)
    except FleeceError:
        return False
    record = layer.disks.get(disk) if layer is not None else None
    return record is not None and not record.qcow2
