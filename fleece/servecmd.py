"""``fleece serve`` and ``fleece live-restore``: a point's disks served from the repository.

``serve``: arguments → ``restore.serve`` → the exports' URIs once they accept connections (one line each,
or one JSON document on one line with ``--json``, flushed at once so a script can wait for it) → wait
for SIGTERM or Ctrl-C.

``live-restore``: arguments → ``restore.live`` → the QEMU arguments to start the VM with, as soon as the
images exist (``--json``: a first line ``{"stage": "ready", …}``) → the stream's progress → a last line
``{"stage": "done", …}`` once the images stand alone.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .output import emit_json, human_bytes

log = logging.getLogger("fleece.serve")


def _commands() -> Any:
    from . import commands

    return commands


def serve_args(p: argparse.ArgumentParser) -> None:
    c = _commands()
    c.add_repo(p)
    p.add_argument("--vm", required=True, type=c.vm_name, help="the VM whose point to serve")
    p.add_argument("--point", default="latest", metavar="ID|latest",
                   help="point id (or a unique prefix); default latest, resolved once at start")
    p.add_argument("--disk", action="append", metavar="ID",
                   help="serve only this disk (repeatable); one disk is also the default export (name \"\")")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", type=Path, help="listen on this Unix socket (made 0600)")
    where.add_argument("--port", metavar="N", type=c.whole_number(1, 65535), help="listen on this TCP port")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address of --port (default 127.0.0.1: NBD has no authentication; anyone who can "
                        "connect reads the disks)")
    p.add_argument("--writable", action="store_true",
                   help="let clients write (nbdkit's cow filter): writes stay in a temporary overlay, nothing "
                        "reaches the repository, all is gone when the server stops")
    p.add_argument("--cache-mib", type=c.whole_number(16, 1 << 20), default=64, metavar="MIB",
                   help="decoded blobs kept in memory per disk (default 64)")
    p.add_argument("--readahead-mib", type=c.whole_number(0, 1024), default=16, metavar="MIB",
                   help="fetched ahead of a sequential reader (default 16; 0 turns read-ahead off)")
    p.add_argument("--workers", type=c.workers_count, default=4, metavar="N",
                   help="parallel fetches from the repository per disk (default 4)")


def serve_run(args: argparse.Namespace) -> int:
    from fleece.repository.errors import ServeError
    from fleece.restore.serve import Server, ServeRequest, plan_serve, uri

    req = ServeRequest(vm=args.vm, point=args.point, disks=args.disk,
                       socket=args.socket.absolute() if args.socket else None, port=args.port, bind=args.bind,
                       writable=args.writable, cache_bytes=args.cache_mib << 20, workers=args.workers,
                       readahead=args.readahead_mib << 20, verbose=args.verbose)
    with _commands().open_repo(args) as repo:
        plan = plan_serve(repo, req)
        server = Server(repo, req, plan, endpoint=args.s3_endpoint)
        try:
            server.start()
            exports = {d: uri(req, d) for d in plan.disks}
            doc = {"vm": plan.point.vm, "point": plan.point.id, "kind": plan.point.kind, "writable": req.writable,
                   "default": uri(req) if plan.default else None, "default_disk": plan.default or None,
                   "exports": exports, "sizes": plan.sizes, "pid": server.proc.pid if server.proc else None}
            if args.json:
                emit_json(doc, one_line=True)
            else:
                print(f"serving point {plan.point.id} of VM {plan.point.vm}"
                      f"{' (writable: writes go to a temporary overlay)' if req.writable else ' (read-only)'}; "
                      "Ctrl-C or SIGTERM stops")
                for d in plan.disks:
                    default = f"  (default: {uri(req)})" if d == plan.default else ""
                    print(f"  {d}: {exports[d]}  {human_bytes(plan.sizes[d])}{default}")
            sys.stdout.flush()
            code = server.wait()
            raise ServeError(f"nbdkit stopped on its own (status {code}): its messages are above")
        except KeyboardInterrupt:  # SIGTERM (the CLI maps it) or Ctrl-C: the way to stop a server
            log.info("stopping")
            return 0
        finally:
            server.stop()


def live_args(p: argparse.ArgumentParser) -> None:
    c = _commands()
    c.add_repo(p)
    p.add_argument("--vm", required=True, type=c.vm_name, help="the VM whose point to restore")
    p.add_argument("--point", default="latest", metavar="ID|latest", help="point id (or a unique prefix); default latest")
    p.add_argument("--disk", action="append", metavar="ID", help="only this disk (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory for the local images (DIR/<disk>.qcow2), made 0700 if missing")
    p.add_argument("--qmp", type=Path, metavar="SOCK",
                   help="the QMP socket of the new QEMU (default: DIR/qmp.sock, in the printed -qmp argument); a "
                        "QEMU started with -S and without the images gets them from fleece, then runs")
    p.add_argument("--print-qemu-args", action="store_true",
                   help="print the QEMU arguments for the images and wait for that QEMU (what happens anyway; "
                        "the flag says it in scripts)")
    p.add_argument("--device", default="virtio-blk-pci", metavar="DRIVER[,PROP=V...]",
                   help="device a -S QEMU gets each disk as (default virtio-blk-pci; on q35 it needs a free "
                        "hot-plug slot, e.g. virtio-blk-pci,bus=rp0 with -device pcie-root-port,id=rp0,chassis=1)")
    p.add_argument("--qmp-timeout", type=c.whole_number(1, 86400), default=600, metavar="S",
                   help="seconds to wait for that QEMU (default 600)")
    p.add_argument("--speed", type=c.whole_number(0), default=0, metavar="MB/S",
                   help="cap each disk's stream (default 0: as fast as it goes)")
    p.add_argument("--stream-retries", type=c.whole_number(0, 100), default=5, metavar="N",
                   help="times a stream paused by a read error is resumed (after 1, 2, 4 … s) before it is "
                        "cancelled (default 5)")
    p.add_argument("--force", action="store_true", help="replace existing images in DIR")
    p.add_argument("--workers", type=c.workers_count, default=4, metavar="N",
                   help="parallel fetches from the repository per disk (default 4)")


def live_run(args: argparse.Namespace) -> int:
    from fleece.repository.errors import LiveRestoreError
    from fleece.restore.live import LiveRequest, LiveRestore

    from .output import Progress

    req = LiveRequest(vm=args.vm, out=args.out, point=args.point, disks=args.disk, qmp=args.qmp,
                      qmp_timeout=args.qmp_timeout, force=args.force, speed=args.speed * 1_000_000,
                      workers=args.workers, resume_attempts=args.stream_retries,
                      device=args.device)
    bar: Progress | None = None
    with _commands().open_repo(args, workers=args.workers) as repo:
        live = LiveRestore(repo, req, endpoint=args.s3_endpoint)
        try:
            started = time.monotonic()
            plan = live.prepare()
            ready = {"stage": "ready", "vm": plan.vm, "point": plan.point, "qmp": str(plan.qmp),
                     "images": {d.disk: str(d.image) for d in plan.disks.values()},
                     "nodes": {d.disk: d.node for d in plan.disks.values()}, "qemu_args": plan.qemu_args,
                     "devices": plan.devices(), "exports": plan.export_uri}
            if args.json:
                emit_json(ready, one_line=True)
            else:
                print(f"images ready for VM {plan.vm} point {plan.point}; start QEMU with:")
                print("  " + " ".join(shlex.quote(a) for a in plan.qemu_args))
                for d, dev in plan.devices().items():
                    print(f"  -device {dev}    (disk {d}; any bus will do)")
                print(f"waiting for its QMP socket {plan.qmp} ...")
            sys.stdout.flush()
            waited = live.attach()
            log.info("QEMU is up on %s after %.1f s; streaming", plan.qmp, waited)
            bar = Progress("live restore", sum(d.size for d in plan.disks.values()), "copied")
            seen = [0]

            def progress(done: int, total: int) -> None:
                bar(done - seen[0], total)  # type: ignore[misc]
                seen[0] = done
            try:
                seconds = live.stream(progress)
            except LiveRestoreError as exc:
                _keep_serving(live, exc, args.json)
                raise
        except KeyboardInterrupt:
            if live.mon is not None:
                log.warning("interrupted while streaming: the server stops now, so the VM's reads of blocks not "
                            "yet copied will fail; the images themselves are intact")
            raise
        finally:
            if bar is not None:
                bar.close()
            live.close()
    doc = {"stage": "done", "vm": plan.vm, "point": plan.point, "seconds": round(time.monotonic() - started, 3),
           "waited_for_qemu_s": round(waited, 3), "stream_s": round(seconds, 3),
           "images": {d.disk: str(d.image) for d in plan.disks.values()},
           "disks": {d.disk: {"size": d.size, "resumes": d.resumes} for d in plan.disks.values()}}
    if args.json:
        emit_json(doc, one_line=True)
    else:
        print(f"live restore done in {seconds:.1f} s of streaming: the images stand alone (no backing file); "
              "the VM runs on them")
    return 0


def _keep_serving(live: Any, exc: Exception, as_json: bool) -> None:
    """A stream that could not finish: the VM still reads what was not copied from the server, so the
    server stays until the user stops it (SIGTERM, Ctrl-C); scripts learn of it at once."""
    if live.server is None:
        return
    log.error("%s", exc)
    if as_json:
        emit_json({"stage": "failed", "error": str(exc)}, one_line=True)
        sys.stdout.flush()
    try:
        live.server.wait()
    except KeyboardInterrupt:
        pass


def mount_args(p: argparse.ArgumentParser) -> None:
    c = _commands()
    c.add_repo(p)
    p.add_argument("--vm", required=True, type=c.vm_name, help="the VM whose point to mount")
    p.add_argument("--point", default="latest", metavar="ID|latest", help="point id (or a unique prefix); default latest")
    p.add_argument("--disk", metavar="ID", help="the disk to show (required when the VM has several)")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT",
                   help="an empty directory: the disk appears in it as the read-only file MOUNTPOINT/<disk>")
    p.add_argument("--cache-mib", type=c.whole_number(16, 1 << 20), default=64, metavar="MIB",
                   help="decoded blobs kept in memory (default 64)")


def mount_run(args: argparse.Namespace) -> int:
    from fleece.repository.errors import ServeError, UsageError
    from fleece.restore.mount import Mount, check_fuse
    from fleece.restore.serve import Server, ServeRequest, plan_serve

    check_fuse()
    req = ServeRequest(vm=args.vm, point=args.point, disks=[args.disk] if args.disk else None,
                       cache_bytes=args.cache_mib << 20, verbose=args.verbose)
    with _commands().open_repo(args) as repo:
        plan = plan_serve(repo, req)
        if len(plan.disks) != 1:
            raise UsageError(f"VM {plan.point.vm} has {len(plan.disks)} disks as of point {plan.point.id} "
                             f"({', '.join(plan.disks)}): name one with --disk")
        server = Server(repo, req, plan, endpoint=args.s3_endpoint)  # on a private socket, for nbdfuse
        mount = Mount(server, plan.disks[0], args.mountpoint)
        try:
            server.start()
            mount.start()
            doc = {"vm": plan.point.vm, "point": plan.point.id, "disk": plan.disks[0], "path": str(mount.path),
                   "size": plan.sizes[plan.disks[0]], "pid": mount.proc.pid if mount.proc else None}
            if args.json:
                emit_json(doc, one_line=True)
            else:
                print(f"point {plan.point.id} of VM {plan.point.vm}: disk {plan.disks[0]} is {mount.describe()}")
                print(f"  a filesystem: mount -o ro,loop {mount.path} DIR; partitions: losetup -r -P --show -f "
                      f"{mount.path}; Ctrl-C or SIGTERM unmounts")
            sys.stdout.flush()
            code = mount.proc.wait() if mount.proc else 0
            raise ServeError(f"nbdfuse stopped on its own (status {code}; unmounted by someone?)")
        except KeyboardInterrupt:
            return 0
        finally:
            mount.stop()
            server.stop()
