"""The subcommands: each is (help, add_arguments, run). ``run`` wires arguments to the core and prints."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from fleece.repository import Repository
from fleece.repository.config import MAX_LEVEL, MIN_LEVEL, RepoConfig
from fleece.repository.credentials import configured
from fleece.repository.errors import UsageError
from fleece.exporter.backup import MAX_WORKERS
from fleece.exporter.images import ImageSpec
from fleece.exporter.inventory import SHUT_OFF
from fleece.repository.manifest import check_note, check_tag, check_vm_name
from fleece.repository.ratelimit import parse_rate

from .output import BackupProgress, Progress, emit_json, human_bytes
from .passwords import add_credential_args, credential_source

DEFAULT_LEVEL = RepoConfig().compression["level"]

log = logging.getLogger("fleece")

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def add_repo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, metavar="REPO",
                   help="repository: a path, file://PATH or s3://BUCKET[/PREFIX]")
    p.add_argument("--s3-endpoint", metavar="URL", default=None, type=endpoint_url,
                   help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    add_credential_args(p)


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for whole numbers in [low, high] whose errors say what is allowed."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*-?[0-9]+\s*", text):  # int() also takes "1_0" and non-ASCII digits
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be at most {high}")
        return value

    return parse


positive_int = whole_number(1)
workers_count = whole_number(1, MAX_WORKERS)


def arg_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a core check: its UsageError becomes argparse's "argument --X: ..." error."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


#: --vm: a name the repository can store (checked before any work)
vm_name = arg_type(check_vm_name)


def _check_endpoint(text: str) -> str:
    from fleece.repository.backends.s3 import check_endpoint  # boto3: only when S3 is used

    return check_endpoint(text, "--s3-endpoint")


#: --s3-endpoint: an http(s) URL with a host (and a valid port), no credentials
endpoint_url = arg_type(_check_endpoint)


def open_repo(args: argparse.Namespace, create: bool = False, **options: Any) -> Repository:
    """Open (with *create*: make) the repository of *args*; a new one is encrypted unless a config
    says otherwise, unlocked with :func:`credential_source` (asked for only when encrypted)."""
    if create:
        options.setdefault("config", RepoConfig.encrypted())
    return Repository.open(args.repo, create=create, endpoint=args.s3_endpoint,
                           create_bucket=getattr(args, "create_bucket", False),
                           credential=credential_source(args), **options)


#: --kdf-time: milliseconds a new passphrase slot's scrypt takes here (like cryptsetup's --iter-time)
kdf_ms = whole_number(0, 60000)


def kdf_seconds_arg(args: argparse.Namespace) -> float | None:
    return None if args.kdf_time is None else args.kdf_time / 1000


# -- init -----------------------------------------------------------------------------------------------

def _init_args(p: argparse.ArgumentParser) -> None:
    add_repo(p)
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    p.add_argument("--compression-level", type=whole_number(MIN_LEVEL, MAX_LEVEL), default=DEFAULT_LEVEL, metavar="N",
                   help=f"zstd level of a new repository, {MIN_LEVEL}-{MAX_LEVEL} (default {DEFAULT_LEVEL}); "
                        "higher stores less and costs more CPU, lower suits fast links and slow CPUs")
    p.add_argument("--no-encryption", action="store_true",
                   help="store plaintext (format 1): anyone who can read the bucket reads the disks")
    p.add_argument("--kdf-time", type=kdf_ms, metavar="MS",
                   help="milliseconds the password's scrypt takes on this machine (default FLEECE_KDF_TIME or "
                        "500; 0 = scrypt's floor, for automation)")
    p.add_argument("--object-lock", type=whole_number(1, 36500), metavar="DAYS",
                   help="S3 Object Lock (WORM): every pack, index object and point is locked for DAYS; the bucket "
                        "must have Object Lock enabled (--create-bucket makes it so)")
    p.add_argument("--object-lock-mode", choices=("governance", "compliance"), default="governance",
                   help="governance (default: users with s3:BypassGovernanceRetention may still delete) or "
                        "compliance (nobody can, not even the bucket's owner, until the lock ends)")


def _init(args: argparse.Namespace) -> int:
    compression = {"algorithm": "zstd", "level": args.compression_level}
    lock = ({"mode": args.object_lock_mode.upper(), "days": args.object_lock}
            if args.object_lock is not None else None)
    config = (RepoConfig(compression=compression, object_lock=lock) if args.no_encryption
              else RepoConfig.encrypted(compression=compression, object_lock=lock))
    with open_repo(args, create=True, config=config, kdf_time=kdf_seconds_arg(args)) as repo:
        if not repo.created and repo.config.compression != config.compression:
            print(f"note: {repo.url} already exists with compression {repo.config.compression}; kept it",
                  file=sys.stderr)
        if not repo.created and repo.config.object_lock != lock:
            print(f"note: {repo.url} already exists with object lock {repo.config.object_lock}; kept it",
                  file=sys.stderr)
        if not repo.created and repo.encrypted != (not args.no_encryption):
            print(f"note: {repo.url} already exists {'en' if repo.encrypted else 'un'}encrypted; kept it",
                  file=sys.stderr)
        cfg = repo.config
        if args.json:
            emit_json({"repo": repo.url, "id": cfg.id, "format": cfg.format, "chunk_size": cfg.chunk_size,
                       "pack_target": cfg.pack_target, "compression": cfg.compression, "encrypted": repo.encrypted,
                       "created": repo.created, "key_slot": repo.slot.id if repo.slot else None,
                       "object_lock": cfg.object_lock})
        else:
            state = "encrypted" if repo.encrypted else "NOT encrypted"
            print(f"repository {repo.url} ready (id {cfg.id}, format {cfg.format}, {state})")
            if repo.created and repo.encrypted:
                print("keep its password safe: without it (or 'fleece key export --paper') nothing can be restored")
    return 0


# -- list -----------------------------------------------------------------------------------------------

def _list_args(p: argparse.ArgumentParser) -> None:
    add_repo(p)
    p.add_argument("--vm", type=vm_name, help="only this VM")


def _list(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        vms, damaged = ([args.vm], {}) if args.vm else repo.vm_listing()
        points = []
        for vm in vms:
            scan = repo.scan(vm)
            points.extend(m.summary() for m in scan.points)
            damaged.update({f"{vm}/{pid}": err for pid, err in scan.damaged.items()})
    if args.json:
        emit_json({"repo": args.repo, "points": points, "damaged": damaged})
    else:
        if not points:
            print("no points" + (f" for VM {args.vm}" if args.vm else ""))
        for p in points:
            dirty = sum(d.get("dirty_bytes", 0) for d in p["disks"].values())
            stored = sum(d.get("stored_bytes", 0) for d in p["disks"].values())
            print(f"{p['id']}  {p['vm']:<16} {p['kind']:<12} disks={','.join(p['disks']) or '-'} "
                  f"host={p.get('host') or '-'} changed={human_bytes(dirty)} stored={human_bytes(stored)}  "
                  f"parent={p['parent'] or '-'}"
                  + (" PROTECTED" if p["protected"] else "") + (f" tags={','.join(p['tags'])}" if p["tags"] else "")
                  + (f" note={p['note']!r}" if p["note"] else ""))
        for name, err in damaged.items():
            print(f"DAMAGED {name}: {err}")
    return 1 if damaged else 0


# -- rebuild-index --------------------------------------------------------------------------------------

def _rebuild_args(p: argparse.ArgumentParser) -> None:
    add_repo(p)


def _rebuild(args: argparse.Namespace) -> int:
    """Salvage: index every intact pack, name every damaged one and the points that lose blobs (exit 1)."""
    with open_repo(args) as repo, repo.maintenance("rebuild-index"):
        report = repo.rebuild_index()
    if args.json:
        emit_json(report.as_dict())
        return 0 if report.ok else 1
    print(f"index rebuilt from {report.packs} intact pack(s) ({report.blobs} blobs) into {report.index}")
    for name, why in report.replaced.items():
        print(f"replaced unreadable {name}: {why}")
    for name, why in report.damaged.items():
        kept = (f" (kept its {report.kept[name]} blob entries from the old index)" if name in report.kept
                else " (not indexed)")
        print(f"DAMAGED {why}{kept}")
    for name in report.missing:
        print(f"MISSING pack {name} (named by the old index)")
    for point, problems in report.points.items():
        print(f"DAMAGED point {point}")
        for problem in problems:
            print(f"        {problem}")
    if not report.ok:
        print(f"{len(report.damaged)} damaged and {len(report.missing)} missing pack(s); {len(report.points)} "
              "point(s) cannot be fully restored; every other point can")
    return 0 if report.ok else 1


# -- backup ---------------------------------------------------------------------------------------------

def _backup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", metavar="SOCK", help="the running VM's QMP unix socket (one fleece may use)")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="instead of --qmp: a running libvirt domain (name or UUID), through libvirt's backup API "
                        "(pull mode with checkpoints); its disk ids are libvirt's target names (vda, sda)")
    p.add_argument("--all", action="store_true",
                   help="every running libvirt domain, each under its own name (with --connect)")
    p.add_argument("--connect", metavar="URI",
                   help="libvirt connection URI for --libvirt/--all (default: libvirt's, e.g. qemu:///system)")
    p.add_argument("--image", action="append", metavar="[ID=]PATH", type=arg_type(ImageSpec.parse),
                   help="instead of --qmp: a disk image of a shut-off VM (repeatable), opened in "
                        "qemu-storage-daemon; ID is its disk id (default: the one its VM's history recorded "
                        "for this file, else the file name)")
    p.add_argument("--image-format", choices=("qcow2", "raw"),
                   help="the format of every --image (default: probed; an image the history recorded as raw "
                        "that probes as qcow2 is refused)")
    add_repo(p)
    p.add_argument("--vm", type=vm_name, help="name the points are stored under (default: QEMU's -name)")
    p.add_argument("--disk", action="append", metavar="ID",
                   help="back up only this disk (device id=; repeatable; default: every writable disk)")
    # nargs="?" + append: "--full" alone appends None (every disk), "--full vdb" appends "vdb"; an option
    # right after a bare --full ("--full --json") is still parsed as that option.
    p.add_argument("--full", nargs="?", action="append", metavar="ID",
                   help="full backup even where an incremental is possible: of every disk, or (with ID, "
                        "repeatable) of that disk only, the others staying incremental")
    p.add_argument("--workers", type=workers_count, default=4, metavar="N",
                   help="parallel NBD connections (and S3 requests) (default 4)")
    p.add_argument("--bwlimit", metavar="RATE", type=parse_rate_arg,
                   help="cap bytes sent to the repository per second, e.g. 20M (K/M/G suffixes)")
    p.add_argument("--scratch", metavar="DIR",
                   help="directory for the fleece's copy-before-write images (default /var/tmp)")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    p.add_argument("--audit-sample", type=whole_number(0, 4096), default=16, metavar="N",
                   help="per incremental disk, re-read N clean blobs (and N/4 zero ranges) and check them against "
                        "the parent point; a mismatch (the bitmap missed writes) makes that disk a verified full "
                        "(default 16, 0 = off)")
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's filesystems through qemu-guest-agent around the point in time "
                        "(an application-consistent point); without an answering agent the point is "
                        "crash-consistent and says why")
    p.add_argument("--qga", metavar="SOCK",
                   help="with --qmp --quiesce: the host end of the guest agent's chardev (libvirt domains: "
                        "libvirt's own channel is used)")
    p.add_argument("--quiesce-timeout", type=seconds_arg, default=30.0, metavar="SECONDS",
                   help="how long the agent may take to freeze or thaw (default 30)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", type=arg_type(check_tag),
                   help="tag the point (repeatable; 'forget --keep-tag' keeps tagged points)")
    p.add_argument("--note", metavar="TEXT", type=arg_type(check_note), help="a note the point carries")
    p.add_argument("--adopt", action="store_true",
                   help="continue the history of --vm even though it was recorded from another machine "
                        "(the same VM moved to a new host, or given a new UUID or new disk files)")


def full_disks(given: list[str | None] | None) -> bool | list[str]:
    """``--full`` as BackupRequest.full: not given → False, a bare ``--full`` anywhere → True, else the ids."""
    if not given:
        return False
    return True if None in given else [d for d in given if d is not None]


parse_rate_arg = arg_type(parse_rate)


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: between 0 and 3600 seconds")
    return value


def _backup(args: argparse.Namespace) -> int:
    from fleece.exporter.backup import BackupRequest, run_backup

    if args.all:
        clash = [opt for opt, v in (("--qmp", args.qmp), ("--image", args.image), ("--libvirt", args.libvirt),
                                    ("--vm", args.vm), ("--disk", args.disk)) if v]
        if clash:
            raise UsageError(f"--all backs up every running libvirt domain under its own name: it excludes "
                             f"{', '.join(clash)}")
        if full_disks(args.full) not in (False, True):
            raise UsageError("--all takes a bare --full (every disk of every domain), not --full ID")
    with open_repo(args, create=True, workers=args.workers, bwlimit=args.bwlimit) as repo:
        given = configured() + [f for f, v in (("--password-file", args.password_file),
                                               ("--key-file", args.key_file)) if v]
        if not repo.encrypted and given:
            # The variables are ignored, as promised; but a config swapped for an unencrypted one (keys/
            # deleted too) would otherwise turn backups into plaintext without a word.
            log.warning("%s is set but %s is NOT encrypted (format 1, made with --no-encryption): this backup is "
                        "stored in plaintext", " and ".join(given), repo.url)

        def one(**target: Any) -> dict[str, Any]:
            bar = BackupProgress("backup")  # committed bytes of the planned total; silent unless stderr is a TTY
            try:
                req = BackupRequest(**target, connect=args.connect, quiesce=args.quiesce, qga=args.qga,
                                    quiesce_timeout=args.quiesce_timeout, vm=args.vm, disks=args.disk,
                                    full=full_disks(args.full), workers=args.workers, scratch=args.scratch,
                                    adopt=args.adopt, audit_sample=args.audit_sample, tags=args.tag, note=args.note,
                                    on_event=bar.event, progress=bar.read, on_committed=bar.committed)
                result = run_backup(repo, req)
            finally:
                bar.close()
            return _backup_doc(result, args.repo, repo)

        try:
            if not args.all:
                doc = one(qmp=args.qmp, images=args.image, image_format=args.image_format, libvirt=args.libvirt)
            else:
                return _backup_all(args, repo, one)
        except BaseException:
            if repo.discard_if_new():  # a failed first backup leaves no --repo behind
                log.debug("removed the repository %s this failed run had created", repo.url)
            raise
    if args.json:
        emit_json(doc)
    else:
        _print_point(doc)
    return 0


def _backup_doc(result: Any, url: str, repo: Repository) -> dict[str, Any]:
    """The ``backup --json`` document of one point (DESIGN §3)."""
    m = result.manifest
    writer = result.stats.get("writer", {})
    doc = {**m.summary(), "pause_ms": result.stats.get("pause_ms"), "duration_s": result.stats.get("duration_s"),
           "uploaded_bytes": writer.get("uploaded_bytes", 0), "new_blobs": writer.get("new_blobs", 0),
           "dedup_blobs": writer.get("dedup_blobs", 0), "repo": url,
           "backend_requests": repo.requests()}
    if "freeze_ms" in result.stats:  # libvirt fixed the point (no guest pause of ours)
        doc["freeze_ms"] = result.stats["freeze_ms"]
    doc["vm_state"] = m.extra.get("vm_state")
    if "quiesce" in m.extra:  # --quiesce: how the freeze went (consistency says whether it did)
        doc["quiesce"] = m.extra["quiesce"]
    return doc


def _print_point(doc: dict[str, Any]) -> None:
    if doc.get("vm_state") == SHUT_OFF:
        how = "shut off"
    elif doc.get("pause_ms") is None:
        how = f"frozen by libvirt in {doc.get('freeze_ms') or 0:.1f} ms"
    else:
        how = f"guest paused {doc['pause_ms']:.1f} ms"
    if doc.get("quiesce"):
        how += (", filesystems quiesced" if doc["consistency"] == "quiesced" else
                f", crash-consistent ({doc['quiesce'].get('reason')})")
    print(f"point {doc['id']} of VM {doc['vm']}: {doc['kind']}, {len(doc['disks'])} disk(s), {how}, "
          f"{doc['duration_s']:.1f} s")
    for name, st in doc["disks"].items():
        print(f"  {name}: {st['kind']:<11} changed {human_bytes(st.get('dirty_bytes', 0))}, read "
              f"{human_bytes(st.get('read_bytes', 0))}, zeroed {human_bytes(st.get('zero_bytes', 0))}, "
              f"stored {human_bytes(st.get('stored_bytes', 0))}")
    print(f"  sent {human_bytes(doc['uploaded_bytes'])} to {doc['repo']}")


def _backup_all(args: argparse.Namespace, repo: Repository, one: Callable[..., dict[str, Any]]) -> int:
    """``backup --all``: every running libvirt domain, one after the other, each its own point under its
    own name. One domain's failure does not stop the others; the exit code is the first failure's (0 when
    every domain was backed up), and ``--json`` prints one document listing every domain's outcome."""
    from fleece.exporter.libvirt_run import running_domains
    from fleece.repository.errors import FleeceError

    names = running_domains(args.connect)
    if not names:
        log.warning("no running libvirt domain on %s: nothing to back up", args.connect or "the default URI")
    results: list[dict[str, Any]] = []
    code = 0
    for name in names:
        try:
            doc = one(libvirt=name)
        except FleeceError as exc:
            message = " ".join(str(exc).split())
            log.error("domain %s: %s", name, message)
            err = exc.to_json()["error"]
            err["message"] = message
            results.append({"domain": name, "ok": False, "error": err})
            code = code or exc.exit
            continue
        results.append({"domain": name, "ok": True, **doc})
        if not args.json:
            _print_point(doc)
    if args.json:
        emit_json({"ok": code == 0, "domains": results})
    elif names:
        failed = [r["domain"] for r in results if not r["ok"]]
        print(f"{len(names) - len(failed)} of {len(names)} domain(s) backed up"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return code


# -- restore --------------------------------------------------------------------------------------------

def _restore_args(p: argparse.ArgumentParser) -> None:
    add_repo(p)
    p.add_argument("--vm", required=True, type=vm_name, help="the VM whose point to restore")
    p.add_argument("--point", default="latest", metavar="ID|latest", help="point id (or a unique prefix); default latest")

    def out_dir(text: str) -> str:
        if not text:  # Path("") is ".": an empty $VAR must not restore into wherever the script runs
            raise argparse.ArgumentTypeError("is empty: it would restore into the current directory; name a "
                                             "directory (--out . if that is what you mean)")
        return text

    p.add_argument("--out", type=out_dir, metavar="DIR",
                   help="directory for the restored images (required unless --verify-only)")
    p.add_argument("--verify-only", action="store_true",
                   help="read, decode and check everything the restore would write, write nothing, report MB/s "
                        "(a disaster-recovery drill)")
    p.add_argument("--disk", action="append", metavar="ID", help="restore only this disk (repeatable)")
    p.add_argument("--flat", action="store_true", help="one flat image per disk instead of a qcow2 chain")
    p.add_argument("--format", choices=("qcow2", "raw"), default="qcow2", help="image format with --flat")
    p.add_argument("--workers", type=workers_count, default=4, metavar="N",
                   help="parallel fetches and NBD writers (default 4)")
    p.add_argument("--force", action="store_true", help="replace existing images in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted restore of the same point into the same --out, skipping what it "
                        "wrote already (without it, its leftovers are removed and the restore starts over)")

    def octal_mode(text: str) -> int:
        from fleece.restore.restore import check_mode

        if not re.fullmatch(r"(0o?)?[0-7]{1,4}", text):
            raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0640")
        return arg_type(lambda t: check_mode(int(t.removeprefix("0o"), 8)))(text)

    p.add_argument("--mode", type=octal_mode, default=None, metavar="OCTAL",
                   help="permissions of the restored image files, e.g. 0640 (default 0600; directories get "
                        "the same plus search where readable: 0700, 0750)")


def _restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleece.restore.restore import RestoreRequest, restore_total, run_restore

    if args.out is None and not args.verify_only:
        raise UsageError("--out DIR is required: name the directory for the restored images (or pass "
                         "--verify-only to check the point without writing)")
    bar: Progress | None = None
    try:
        with open_repo(args, workers=args.workers) as repo:
            bar = Progress("verify" if args.verify_only else "restore",
                           restore_total(repo, args.vm, args.point, args.disk, args.flat),
                           "checked" if args.verify_only else "written")
            result = run_restore(repo, RestoreRequest(vm=args.vm, out=Path(args.out or "."), point=args.point,
                                                      disks=args.disk, flat=args.flat, format=args.format,
                                                      workers=args.workers, force=args.force, progress=bar,
                                                      mode=args.mode, verify_only=args.verify_only,
                                                      resume=args.resume))
            requests = repo.requests()
    finally:
        if bar is not None:
            bar.close()
    if args.verify_only:
        return _verified(args, result, requests)
    doc = {"vm": args.vm, "point": result.point.id, "kind": result.point.kind, "mode": "flat" if args.flat else "chain",
           "seconds": result.seconds, "mb_per_s": result.mb_per_s, "backend_requests": requests,
           "resumed_bytes": sum(d.stats.get("resumed_bytes", 0) for d in result.disks),
           # per disk, "point" is the point holding its newest layer up to the requested one ("in_point": the
           # requested point itself; otherwise a --disk backup left it out, or the disk left the VM)
           "disks": {d.disk: {"path": str(d.path), "layers": [str(p) for p in d.layers], **d.stats,
                              "point": d.point, "in_point": d.point == result.point.id}
                     for d in result.disks}}
    if args.json:
        emit_json(doc)
    else:
        print(f"restored point {result.point.id} of VM {args.vm} in {result.seconds:.1f} s")
        for d in result.disks:
            extra = f" (chain of {len(d.layers)})" if not args.flat else ""
            older = "" if d.point == result.point.id else f", as of point {d.point} (not in this point)"
            print(f"  {d.disk}: {d.path}{extra}, {human_bytes(d.stats.get('data_bytes', 0))} written{older}")
    return 0


def _verified(args: argparse.Namespace, result: Any, requests: dict[str, int]) -> int:
    """The report of ``restore --verify-only`` (it raised on any damage: reaching here means it restores)."""
    doc = {"vm": args.vm, "point": result.point.id, "kind": result.point.kind, "mode": "flat" if args.flat else "chain",
           "verify_only": True, "seconds": result.seconds, "mb_per_s": result.mb_per_s, "backend_requests": requests,
           "disks": {d.disk: {**d.stats, "point": d.point, "in_point": d.point == result.point.id}
                     for d in result.disks}}
    if args.json:
        emit_json(doc)
    else:
        plain = sum(d.stats.get("plain_bytes", 0) for d in result.disks)
        print(f"point {result.point.id} of VM {args.vm} restores: {human_bytes(plain)} read and checked in "
              f"{result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s), nothing written")
    return 0


# -- verify ---------------------------------------------------------------------------------------------

def _verify_args(p: argparse.ArgumentParser) -> None:
    add_repo(p)
    p.add_argument("--vm", type=vm_name, help="only this VM")
    p.add_argument("--point", metavar="ID",
                   help="only this point (and the layers of every disk the VM had then); needs --vm")
    p.add_argument("--read-data", action="store_true", help="read and check every referenced blob")
    p.add_argument("--workers", type=workers_count, default=4, metavar="N", help="parallel reads (default 4)")


def _verify(args: argparse.Namespace) -> int:
    from fleece.repository.check import verify, verify_total

    if args.point and not args.vm:
        raise UsageError("--point needs --vm")
    bar: Progress | None = None
    try:
        with open_repo(args, workers=args.workers) as repo:
            if args.read_data:  # only reading data makes progress worth showing
                bar = Progress("verify", verify_total(repo, args.vm, args.point), "read")
            report = verify(repo, vm=args.vm, point=args.point, read_data=args.read_data, workers=args.workers,
                            progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        emit_json({"ok": report.ok, "read_data": args.read_data, "points": [p.as_dict() for p in report.points],
                   "repository_problems": report.repository_problems, "damaged_packs": report.damaged_packs,
                   "blobs_checked": report.blobs_checked, "bytes_read": report.bytes_read,
                   "seconds": report.seconds, "mb_per_s": report.mb_per_s})
    else:
        for problem in report.repository_problems:
            print(f"DAMAGED {problem}")
        for p in report.points:
            print(f"{'ok     ' if p.ok else 'DAMAGED'} {p.vm} {p.id}")
            for problem in p.problems:
                print(f"        {problem}")
        what = (f", {report.blobs_checked} blobs read ({human_bytes(report.bytes_read)}, {report.mb_per_s:.0f} MB/s)"
                if args.read_data else "")
        print(f"{len(report.points)} point(s) checked{what}: " + ("all ok" if report.ok else "DAMAGE FOUND"))
    return 0 if report.ok else 1


COMMANDS: dict[str, Command] = {
    "backup": ("back up a running VM's disks to one point in time", _backup_args, _backup),
    "init": ("create a repository (backup creates one on first use too)", _init_args, _init),
    "list": ("list the points in time of a repository", _list_args, _list),
    "restore": ("rebuild a point in time as a qcow2 chain or a flat image", _restore_args, _restore),
    "verify": ("check that every point can be restored", _verify_args, _verify),
    "rebuild-index": ("regenerate the index from the packs' own tables", _rebuild_args, _rebuild),
}


def _register_key() -> None:
    from .keycmd import key_args, key_run
    from . import maintcmd as m

    COMMANDS["key"] = ("manage the passwords and key files of an encrypted repository", key_args, key_run)
    COMMANDS["forget"] = ("remove points by a retention policy (kept points stay restorable)", m.forget_args,
                          m.forget_run)
    COMMANDS["prune"] = ("delete the data no point needs (safe while backups run)", m.prune_args, m.prune_run)
    COMMANDS["protect"] = ("protect a point from forget (and set its note and tags)", m.protect_args, m.protect_run)
    COMMANDS["unprotect"] = ("let forget remove a point again", m.protect_args, m.unprotect_run)
    from .servecmd import live_args, live_run, mount_args, mount_run, serve_args, serve_run

    COMMANDS["serve"] = ("serve a point's disks as NBD exports from the repository (boot a VM from a backup)",
                         serve_args, serve_run)
    COMMANDS["live-restore"] = ("start a VM on a point at once and copy its disks home while it runs", live_args,
                                live_run)
    COMMANDS["mount"] = ("show a point's disk as a read-only file on this host (FUSE), for file-level restore",
                         mount_args, mount_run)


_register_key()

