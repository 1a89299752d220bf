"""``fleece forget``, ``fleece prune``, ``fleece protect`` / ``unprotect``: the retention commands.

Thin: arguments → ``repository.forget`` / ``prune`` / ``annotate`` → one table or one JSON document.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import tzinfo
from typing import Any

from fleece.repository.errors import UsageError
from fleece.repository.manifest import check_note, check_tag
from fleece.repository.merge import MAX_CHAIN
from fleece.repository.prune import DEFAULT_MAX_UNUSED, PruneReport, check_grace

from .output import emit_json, human_bytes


def _commands() -> Any:
    from . import commands  # the shared flag helpers (commands imports this module lazily)

    return commands


def _count(text: str) -> int:
    if not re.fullmatch(r"\s*(-1|[0-9]+)\s*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: use a number of 0 or more, or -1 for unlimited")
    return int(text)


def _unused(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%?\s*", text)
    if not m or float(m.group(1)) > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage: use e.g. 5% (0-100)")
    return float(m.group(1)) / 100


def _zone(text: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time zone: use e.g. UTC or Europe/Berlin") from None


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grace", type=_commands().arg_type(check_grace), default=24 * 3600.0, metavar="DURATION",
                   help="how long condemned packs wait before they are deleted, longer than any backup runs "
                        "(default 24h; 0 deletes at once: only when nothing else writes to the repository)")
    p.add_argument("--max-unused", type=_unused, default=DEFAULT_MAX_UNUSED, metavar="PCT",
                   help=f"repack partly used packs while more than PCT of the stored bytes are unused (default "
                        f"{DEFAULT_MAX_UNUSED * 100:.0f}%%; 100%% never repacks: repacking downloads and uploads)")


# -- forget ---------------------------------------------------------------------------------------------

def forget_args(p: argparse.ArgumentParser) -> None:
    c = _commands()
    c.add_repo(p)
    p.add_argument("--vm", type=c.vm_name, required=True, help="the VM whose points to forget")
    p.add_argument("--keep-last", type=_count, default=0, metavar="N", help="keep the N newest points (-1: all)")
    for rule, bucket in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"),
                         ("yearly", "years")):
        p.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N",
                       help=f"keep the newest point of each of the N latest {bucket} that have points (-1: all)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every point made within DURATION of the newest one (e.g. 7d, 12h, 1y6m)")
    p.add_argument("--keep-tag", action="append", type=c.arg_type(check_tag), default=[], metavar="TAG",
                   help="keep every point carrying TAG (repeatable)")
    p.add_argument("--timezone", type=_zone, metavar="TZ",
                   help="time zone of the hour/day/week/month/year buckets (default: this host's)")
    p.add_argument("--max-chain", type=c.whole_number(1, 10000), default=MAX_CHAIN, metavar="N",
                   help=f"merge a disk's chain into a self-contained layer where it gets longer than N layers "
                        f"(default {MAX_CHAIN}): a chain restore writes one qcow2 per layer")
    p.add_argument("--dry-run", action="store_true", help="show what would go and what it frees; change nothing")
    p.add_argument("--prune", action="store_true", help="run 'fleece prune' afterwards")
    add_prune_args(p)


def forget_run(args: argparse.Namespace) -> int:
    from fleece.repository.forget import forget
    from fleece.repository.prune import prune
    from fleece.repository.retention import Policy, parse_duration

    policy = Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily, weekly=args.keep_weekly,
                    monthly=args.keep_monthly, yearly=args.keep_yearly,
                    within=parse_duration(args.keep_within) if args.keep_within is not None else None,
                    tags=frozenset(args.keep_tag))
    if policy.empty():
        raise UsageError("no keep rule given: pass at least one of --keep-last, --keep-hourly, --keep-daily, "
                         "--keep-weekly, --keep-monthly, --keep-yearly, --keep-within, --keep-tag; nothing was removed")
    with _commands().open_repo(args) as repo:
        report = forget(repo, args.vm, policy, dry_run=args.dry_run, tz=args.timezone, max_chain=args.max_chain)
        pruned = None
        if args.prune:
            pruned = prune(repo, grace=args.grace, max_unused=args.max_unused, dry_run=args.dry_run)
    if args.json:
        emit_json({**report.as_dict(), "prune": pruned.as_dict() if pruned else None})
        return 0
    print(f"VM {report.vm}: {report.policy}")
    for p in report.points:
        extra = []
        if p.merged:
            extra.append(f"merged into a self-contained layer: {', '.join(p.merged)}")
        if not p.keep:
            extra.append(f"frees {human_bytes(p.frees)}")
        print(f"{'keep' if p.keep else 'remove':<7} {p.id}  {p.kind:<12} {', '.join(p.reasons) or '-'}"
              + (f"  ({'; '.join(extra)})" if extra else ""))
    gone = sum(not p.keep for p in report.points)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {gone} of {len(report.points)} point(s); {human_bytes(report.frees)} no point needs any more "
          + ("(dry run: nothing changed)" if report.dry_run else "(freed by prune)"))
    if pruned:
        _print_prune(pruned)
    return 0


# -- prune ----------------------------------------------------------------------------------------------

def prune_args(p: argparse.ArgumentParser) -> None:
    _commands().add_repo(p)
    add_prune_args(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be condemned, repacked and deleted")


def prune_run(args: argparse.Namespace) -> int:
    from fleece.repository.prune import prune

    with _commands().open_repo(args) as repo:
        report = prune(repo, grace=args.grace, max_unused=args.max_unused, dry_run=args.dry_run)
    if args.json:
        emit_json(report.as_dict())
    else:
        _print_prune(report)
    return 0


def _print_prune(r: PruneReport) -> None:
    would = "would be " if r.dry_run else ""
    print(f"{r.packs} pack(s), {human_bytes(r.stored_bytes)}: {human_bytes(r.used_bytes)} used, "
          f"{human_bytes(r.unused_bytes)} unused")
    if r.adopted_packs:
        print(f"{r.adopted_packs} pack(s) {would}indexed again (they hold blobs points need, but no index object "
              "named them)")
    if r.repacked_packs:
        print(f"{r.repacked_packs} pack(s) {would}repacked ({human_bytes(r.repacked_bytes)} of blobs written again)")
    print(f"{r.condemned_packs} pack(s) ({human_bytes(r.condemned_bytes)}) {would}condemned; deleted after the grace "
          f"of {_span(r.grace)}")
    if r.deleted_packs or r.rescued_packs:
        print(f"{r.deleted_packs} pack(s) ({human_bytes(r.deleted_bytes)}) {would}deleted, {r.rescued_packs} rescued "
              "(a point committed since needs them)")
    for w in r.waiting:
        print(f"waiting: {w['packs']} pack(s) of {w['record']} may be deleted from "
              f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(w['deletable_from']))} by a later prune")
    if r.index_objects:
        print(f"index consolidated into {len(r.index)} object(s) ({r.index_objects} replaced)")


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- protect / unprotect ----------------------------------------------------------------------------------

def protect_args(p: argparse.ArgumentParser) -> None:
    c = _commands()
    c.add_repo(p)
    p.add_argument("--vm", type=c.vm_name, required=True)
    p.add_argument("--point", required=True, metavar="ID", help="the point (an id, a unique prefix, or latest)")
    tag = c.arg_type(check_tag)
    p.add_argument("--note", type=c.arg_type(check_note), metavar="TEXT",
                   help="a note the point carries ('' removes it)")
    p.add_argument("--tag", action="append", type=tag, default=[], metavar="TAG", help="add a tag (repeatable)")
    p.add_argument("--untag", action="append", type=tag, default=[], metavar="TAG", help="remove a tag (repeatable)")


def _annotate(args: argparse.Namespace, protected: bool) -> int:
    from fleece.repository.annotate import annotate

    with _commands().open_repo(args) as repo:
        m = annotate(repo, args.vm, args.point, protected=protected, note=args.note, add_tags=args.tag,
                     remove_tags=args.untag)
    summary = m.summary()
    if args.json:
        emit_json({"id": m.id, "vm": m.vm, "protected": summary["protected"], "tags": summary["tags"],
                   "note": summary["note"]})
    else:
        print(f"point {m.id} of VM {m.vm}: {'protected from forget' if protected else 'not protected'}"
              + (f", tags {', '.join(summary['tags'])}" if summary["tags"] else "")
              + (f", note {summary['note']!r}" if summary["note"] else ""))
    return 0


def protect_run(args: argparse.Namespace) -> int:
    return _annotate(args, True)


def unprotect_run(args: argparse.Namespace) -> int:
    return _annotate(args, False)
