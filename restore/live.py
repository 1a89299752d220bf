"""Live restore: start a VM on a point at once, and copy the point home while the guest runs.

Each disk gets a local qcow2 whose *backing file is the NBD export* of the point (``fleece serve``,
:mod:`.serve`): nothing is copied before the VM starts, its reads of untouched blocks go to the
repository, its writes land in the local image. QEMU's own ``block-stream`` job then copies every block
the local image does not hold yet from the backing into it, while the guest runs; when it completes QEMU
drops the backing link from the image header, and the server is no longer needed.

Sequence (:class:`LiveRestore`):

1. :meth:`~LiveRestore.prepare` — serve the point (on the server's private socket), create
   ``OUT/<disk>.qcow2`` (``0600``, the source's cluster size) backed by ``nbd+unix:///<disk>?socket=…``,
   and say how to start QEMU on them (:attr:`LivePlan.qemu_args`: one ``-blockdev`` per disk with a fixed
   node name, and a ``-qmp`` socket in ``OUT`` unless the caller names the QMP socket its QEMU opens).
2. :meth:`~LiveRestore.attach` — wait until that QEMU's QMP socket answers; check that each node is
   there and backed by this server (a QEMU started with other images must not be streamed into). A QEMU
   started with ``-S`` and without the images gets them from fleece (``blockdev-add``, ``device_add``)
   and is then let run (``cont``).
3. :meth:`~LiveRestore.stream` — one ``block-stream`` per disk (no base: everything; ``on-error=stop``,
   kept after it ends so its outcome is read, not guessed). A read error (the bucket unreachable, a
   damaged blob — the server returns EIO, never wrong bytes) *pauses* the job: it is resumed after a
   back-off, :data:`RESUME_ATTEMPTS` times, then cancelled. A cancelled or failed stream leaves the image
   as it was — correct, still backed by the server — and :class:`LiveRestoreError` says so; nothing in the
   image is ever written but by QEMU itself.
4. Done when every job has concluded without error and each image reports no backing file any more; the
   server stops then (:meth:`~LiveRestore.close`).

Bit-exactness: the image ends as the point plus whatever the guest wrote — the same as a normal restore
booted and written to — because ``block-stream`` copies only what the top image does not allocate.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleece.exporter.qmp import Monitor  # the QMP facade only: no backup logic (see the issue note)
from fleece.repository import Repository
from fleece.repository.errors import CommandError, LiveRestoreError, QemuError, QmpConnectError, UsageError

from .guard import check_out, refuse_in_use
from .serve import Server, ServePlan, ServeRequest, plan_serve, uri
from .targets import FILE_MODE, create_qcow2, dir_mode, make_dirs

log = logging.getLogger(__name__)

NODE_PREFIX = "fleece-live-"
JOB_PREFIX = "fleece-live-"
#: a paused (failed) stream is resumed this many times, after 1, 2, 4 … seconds, before it is cancelled
RESUME_ATTEMPTS = 5
POLL_S = 0.5


@dataclass
class LiveRequest:
    vm: str
    out: Path
    point: str | None = None
    disks: list[str] | None = None
    qmp: Path | None = None  # the QMP socket the new QEMU opens; None: OUT/qmp.sock (in the printed args)
    qmp_timeout: float = 600.0  # how long to wait for that QEMU
    force: bool = False  # replace images in OUT
    speed: int = 0  # bytes/s per stream job (0: unlimited)
    resume_attempts: int = RESUME_ATTEMPTS  # of a stream paused by a read error, before it is cancelled
    device: str = "virtio-blk-pci"  # what a QEMU started with -S gets its disks as (see LiveRestore._plug)
    cache_bytes: int = 64 << 20
    workers: int = 4


@dataclass
class DiskStream:
    disk: str
    image: Path
    node: str
    size: int
    job: str
    done: int = 0
    status: str = "pending"
    resumes: int = 0
    error: str | None = None


@dataclass
class LivePlan:
    point: str
    vm: str
    disks: dict[str, DiskStream]
    qmp: Path
    qmp_ours: bool  # whether fleece chose the path (and QEMU must be told with -qmp)
    export_uri: dict[str, str] = field(default_factory=dict)

    @property
    def qemu_args(self) -> list[str]:
        """What to add to the new QEMU's command line: each image as a block node with a fixed name (attach a
        device to it: ``-device virtio-blk-pci,drive=NODE``, or any bus), and its QMP socket."""
        args: list[str] = []
        for d in self.disks.values():
            args += ["-blockdev", f"driver=qcow2,node-name={d.node},file.driver=file,file.filename={d.image}"]
        if self.qmp_ours:
            args += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        return args

    def devices(self) -> dict[str, str]:
        """A suggested ``-device`` per disk (virtio-blk; the guest may need another bus)."""
        return {d.disk: f"virtio-blk-pci,drive={d.node},id={d.disk}" for d in self.disks.values()}


class LiveRestore:
    """One live restore (module docstring): ``prepare`` → ``attach`` → ``stream`` → ``close``."""

    def __init__(self, repo: Repository, req: LiveRequest, endpoint: str | None = None) -> None:
        self.repo = repo
        self.req = req
        self.endpoint = endpoint
        self.server: Server | None = None
        self.plan: LivePlan | None = None
        self.mon: Monitor | None = None
        self._made: list[Path] = []  # images made here: removed again if no QEMU ever used them
        self._attached = False

    # -- 1. prepare ----------------------------------------------------------------------------------------

    def prepare(self) -> LivePlan:
        req = self.req
        serve_req = ServeRequest(vm=req.vm, point=req.point, disks=req.disks, cache_bytes=req.cache_bytes,
                                 workers=req.workers)
        splan: ServePlan = plan_serve(self.repo, serve_req)
        out = req.out.absolute()
        images = {d: out / f"{d}.qcow2" for d in splan.disks}
        existing = [str(p) for p in images.values() if os.path.lexists(p)]
        if existing and not req.force:
            raise UsageError(f"{', '.join(existing)} exist already: choose another --out, or pass --force to "
                             "replace them")
        refuse_in_use([p for p in images.values() if os.path.lexists(p)])  # not even --force: a VM runs on it
        check_out(out)
        make_dirs(out, dir_mode(FILE_MODE))
        self.server = Server(self.repo, serve_req, splan, endpoint=self.endpoint)  # on a private socket
        self.server.start()
        disks: dict[str, DiskStream] = {}
        for d in splan.disks:
            rec = splan.view[d].disks[d]
            image = images[d]
            if os.path.lexists(image):
                image.unlink()
            create_qcow2(image, rec.virtual_size, rec.qcow2, backing=uri(serve_req, d), backing_format="raw")
            self._made.append(image)
            disks[d] = DiskStream(d, image, f"{NODE_PREFIX}{d}", rec.virtual_size, f"{JOB_PREFIX}{d}")
        qmp = req.qmp.absolute() if req.qmp is not None else out / "qmp.sock"
        self.plan = LivePlan(splan.point.id, splan.point.vm, disks, qmp, req.qmp is None,
                             {d: uri(serve_req, d) for d in splan.disks})
        log.info("live restore of VM %s point %s: images %s, served at %s", splan.point.vm, splan.point.id,
                 ", ".join(str(d.image) for d in disks.values()), serve_req.socket)
        return self.plan

    # -- 2. attach ----------------------------------------------------------------------------------------

    def attach(self) -> float:
        """Wait for the new QEMU's QMP socket (up to ``qmp_timeout``); check its nodes. Seconds waited."""
        assert self.plan is not None
        started = time.monotonic()
        deadline = started + self.req.qmp_timeout
        path = str(self.plan.qmp)
        while True:
            if os.path.exists(path):
                try:
                    self.mon = Monitor(path)
                    break
                except QmpConnectError:
                    pass  # QEMU still starting (socket bound, not yet listening), or not QEMU yet
            if time.monotonic() > deadline:
                raise LiveRestoreError(f"no QEMU answered on {path} within {self.req.qmp_timeout:.0f} s: start it "
                                       "with the arguments printed (the images and the server wait)")
            time.sleep(0.2)
        self._attached = True
        nodes = {n.get("node-name"): n for n in self.mon.cmd("query-named-block-nodes", {"flat": True})}
        missing = [d for d in self.plan.disks.values() if d.node not in nodes]
        if missing:
            self._plug(missing)
            nodes = {n.get("node-name"): n for n in self.mon.cmd("query-named-block-nodes", {"flat": True})}
        for d in self.plan.disks.values():
            node = nodes.get(d.node)
            if node is None:
                raise LiveRestoreError(f"the QEMU at {path} has no block node {d.node}: start it with "
                                       f"-blockdev driver=qcow2,node-name={d.node},file.filename={d.image} (the "
                                       "arguments printed)")
            opened = str(node.get("file", ""))
            try:
                same = os.path.samefile(opened, d.image)
            except OSError:
                same = False
            backing = node.get("backing_file") or node.get("image", {}).get("backing-filename")
            if not same or backing != self.plan.export_uri[d.disk]:
                raise LiveRestoreError(f"block node {d.node} of the QEMU at {path} is {opened or '?'} backed by "
                                       f"{backing or 'nothing'}, not {d.image} backed by this restore's server: it "
                                       "was started with other images; nothing was streamed")
        return time.monotonic() - started

    def _plug(self, disks: list[DiskStream]) -> None:
        """A QEMU started without the images (``--qmp`` of a VM started with ``-S``): add each image as a
        block node and a device (:attr:`LiveRequest.device`, id = the disk), then let the VM run. Only a VM
        that has not run yet (``prelaunch``: ``-S``) is changed — hot-plugging disks into a running guest
        that did not ask for them is not a restore."""
        assert self.mon is not None
        status = self.mon.cmd("query-status").get("status")
        if status != "prelaunch":
            raise LiveRestoreError(f"the QEMU at {self.plan.qmp if self.plan else '?'} has no node "  # type: ignore[union-attr]
                                   f"{disks[0].node} and is {status}: start it with the printed -blockdev "
                                   "arguments, or with -S (fleece then adds the disks and starts it)")
        driver, *options = self.req.device.split(",")
        if not driver or any("=" not in o for o in options):  # before any node is added
            raise UsageError(f"--device {self.req.device!r}: give DRIVER[,PROP=VALUE...], e.g. "
                             "virtio-blk-pci,bus=rp0")
        props = dict(o.split("=", 1) for o in options)
        for d in disks:
            self.mon.cmd("blockdev-add", {"driver": "qcow2", "node-name": d.node,
                                          "file": {"driver": "file", "filename": str(d.image)}})
            try:
                self.mon.cmd("device_add", {"driver": driver, **props, "drive": d.node, "id": d.disk})
            except CommandError as exc:
                raise LiveRestoreError(f"QEMU refused to add disk {d.disk} as {self.req.device}: {exc.desc} — on "
                                       "q35 give it a free slot: -device pcie-root-port,id=rp0,chassis=1 and "
                                       "--device virtio-blk-pci,bus=rp0 (one port per disk), or start QEMU with the "
                                       "printed -blockdev arguments instead") from None
            log.info("disk %s: added %s as a %s (id %s)", d.disk, d.image, self.req.device, d.disk)
        self.mon.cmd("cont")

    # -- 3. stream ----------------------------------------------------------------------------------------

    def stream(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Run every disk's ``block-stream`` to its end; seconds it took. :class:`LiveRestoreError` if one
        cannot finish (its image stays correct, backed by the server)."""
        assert self.plan is not None and self.mon is not None
        started = time.monotonic()
        for d in self.plan.disks.values():
            args: dict[str, Any] = {"job-id": d.job, "device": d.node, "on-error": "stop", "auto-dismiss": False}
            if self.req.speed:
                args["speed"] = self.req.speed
            self.mon.cmd("block-stream", args)
            d.status = "running"
        backoff: dict[str, float] = {}
        total = sum(d.size for d in self.plan.disks.values())
        while any(d.status not in ("concluded", "failed") for d in self.plan.disks.values()):
            jobs = {j["id"]: j for j in self.mon.cmd("query-jobs")}
            for d in self.plan.disks.values():
                if d.status in ("concluded", "failed"):
                    continue
                job = jobs.get(d.job)
                if job is None:
                    d.status, d.error = "failed", "the job vanished (another client dismissed or cancelled it)"
                    continue
                d.done = int(job.get("current-progress", 0))
                if job["status"] == "concluded":
                    d.status = "concluded"
                    d.error = job.get("error")
                    self.mon.cmd("job-dismiss", {"id": d.job})
                    if d.error:
                        d.status = "failed"
                elif job["status"] == "paused":  # on-error=stop: a read from the backing failed
                    self._paused(d, backoff)
            if progress is not None:
                progress(sum(d.done for d in self.plan.disks.values()), total)
            time.sleep(POLL_S)
        failed = [d for d in self.plan.disks.values() if d.status == "failed"]
        if failed:
            raise LiveRestoreError(
                "; ".join(f"disk {d.disk}: the stream stopped ({d.error})" for d in failed) +
                ": the images are intact (with the guest's writes) and read the rest from the server, which this "
                "command keeps running until SIGTERM or Ctrl-C — shut the VM down first (once the server stops, its "
                "reads of blocks not copied fail), then restore the point with 'fleece restore'")
        for d in self.plan.disks.values():
            self._check_standalone(d)
        return time.monotonic() - started

    def _paused(self, d: DiskStream, backoff: dict[str, float]) -> None:
        assert self.mon is not None
        now = time.monotonic()
        if d.job not in backoff:
            d.resumes += 1
            if d.resumes > self.req.resume_attempts:
                log.error("disk %s: the stream failed %d times reading the backup; cancelling it", d.disk,
                          d.resumes)
                d.error = "reads from the repository kept failing"
                self.mon.cmd("job-cancel", {"id": d.job})
                d.status = "cancelling"
                return
            wait = 2 ** (d.resumes - 1)
            log.warning("disk %s: the stream paused on a read error from the repository (see the server's log); "
                        "resuming in %d s (%d/%d)", d.disk, wait, d.resumes, self.req.resume_attempts)
            backoff[d.job] = now + wait
        elif now >= backoff[d.job]:
            del backoff[d.job]
            try:
                self.mon.cmd("job-resume", {"id": d.job})
            except CommandError as exc:
                log.debug("job-resume %s: %s", d.job, exc)

    def _check_standalone(self, d: DiskStream) -> None:
        """After a stream, QEMU has rewritten the image header without a backing file: check it did."""
        assert self.mon is not None
        for n in self.mon.cmd("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") == d.node and n.get("backing_file"):
                raise LiveRestoreError(f"disk {d.disk}: the stream ended but {d.image} still names a backing file "
                                       f"({n['backing_file']}); keep this command running and report it")

    # -- 4. close ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect and stop the server. Images no QEMU ever opened are removed (a cancelled start)."""
        if self.mon is not None:
            try:
                self.mon.close()
            except QemuError:
                pass
            self.mon = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if not self._attached:
            for p in self._made:
                p.unlink(missing_ok=True)
