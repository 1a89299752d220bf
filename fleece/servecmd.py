"""``fleece serve``: a point's disks as NBD exports, in the foreground until SIGTERM or Ctrl-C.

Thin: arguments → ``restore.serve`` → the exports' URIs once they accept connections (one line each, or
one JSON document with ``--json``, flushed at once so a script can wait for it) → wait.
"""

from __future__ import annotations

import argparse
import logging
import sys
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
