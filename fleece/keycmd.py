"""``fleece key list|add|remove|passwd|export``: the key slots of an encrypted repository.

Every action touches only ``keys/`` objects: passwords are added, rotated and removed without
re-encrypting any data. Adding needs the repository unlocked (``--password-file``, ``FLEECE_PASSWORD``…)
and the new secret (``FLEECE_NEW_PASSWORD``…, ``--new-password-file``, ``--new-key-file``, or a prompt).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleece.repository.crypto import FULL, WRITE_ONLY, KeySlot, MasterKey, export_paper
from fleece.repository.errors import KeyAccessError, UsageError

from .output import emit_json
from .passwords import new_credential


def _common(p: argparse.ArgumentParser) -> None:
    from .commands import add_repo

    add_repo(p)
    # SUPPRESS: "fleece key --json list" and "fleece key list --json" both work, neither default overrides
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document on stdout")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")


def _new_secret_args(p: argparse.ArgumentParser) -> None:
    from .commands import kdf_ms

    p.add_argument("--new-password-file", metavar="FILE",
                   help="the new password from FILE (else FLEECE_NEW_PASSWORD / _FILE / _COMMAND, or a prompt)")
    p.add_argument("--new-key-file", metavar="FILE",
                   help="a key-file slot instead: FILE's bytes (≥ 32) open it; a missing FILE is created with 64 "
                        "random bytes, mode 0600")
    p.add_argument("--label", default="", help="a note kept with the slot, e.g. the host or person it is for")
    p.add_argument("--kdf-time", type=kdf_ms, metavar="MS",
                   help="milliseconds the new password's scrypt takes here (default FLEECE_KDF_TIME or 500)")


def key_args(p: argparse.ArgumentParser) -> None:
    from .cli import _Parser

    sub = p.add_subparsers(dest="key_action", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    a = sub.add_parser("list", help="the key slots: id, kind, access, label")
    _common(a)
    a = sub.add_parser("add", help="add a password or key file (full, or --write-only for backup hosts)")
    _common(a)
    _new_secret_args(a)
    a.add_argument("--write-only", action="store_true",
                   help="the new key can add backups but never read disk contents back (for hypervisors)")
    a.add_argument("--paper-key-file", metavar="FILE",
                   help="unlock with the paper key of 'fleece key export --paper' (recovery, when every "
                        "password is lost)")
    a = sub.add_parser("remove", help="remove a key slot (never the last full one)")
    _common(a)
    a.add_argument("slot", metavar="ID", help="the slot id (or a unique prefix) 'fleece key list' shows")
    a = sub.add_parser("passwd", help="replace the password (or key file) used to unlock with a new one")
    _common(a)
    _new_secret_args(a)
    a = sub.add_parser("export", help="print the master key for safekeeping on paper")
    _common(a)
    a.add_argument("--paper", action="store_true", required=True,
                   help="as 9 groups of 8 hex digits (the last a check): keep it offline, it opens everything")


def _slot_doc(slot: KeySlot, current: KeySlot | None) -> dict[str, Any]:
    kdf = {k: v for k, v in slot.kdf.items() if k != "salt"}
    return {"id": slot.id, "kind": slot.kind, "access": slot.access, "label": slot.label, "created": slot.created,
            "kdf": kdf, "current": current is not None and current.id == slot.id}


def key_run(args: argparse.Namespace) -> int:
    from .commands import kdf_seconds_arg, open_repo

    action = args.key_action
    with open_repo(args) as repo:
        if not repo.encrypted:
            raise UsageError(f"{repo.url} is not encrypted (created with --no-encryption): it has no keys; back it up "
                             "into a new, encrypted repository to protect it")
        if action == "list":
            slots = repo.key_slots()
            docs = [_slot_doc(s, repo.slot) for s in sorted(slots, key=lambda s: s.created)]
            if args.json:
                emit_json({"repo": args.repo, "slots": docs})
            else:
                for d in docs:
                    print(f"{'*' if d['current'] else ' '} {d['id']}  {d['kind']:<10} {d['access']:<10} "
                          f"{d['created']}  {d['label']}")
            return 0
        if action in ("add", "passwd"):
            if action == "passwd" and repo.slot is None:
                raise UsageError("passwd replaces the key slot you unlocked with; the paper key is not one: use "
                                 "'fleece key add --paper-key-file FILE' instead")
            access = ((WRITE_ONLY if args.write_only else FULL) if action == "add"
                      else repo.slot.access)  # type: ignore[union-attr]
            label = args.label or (repo.slot.label if action == "passwd" and repo.slot else "")
            slot = repo.add_key(new_credential(args), access=access, label=label, kdf_time=kdf_seconds_arg(args))
            removed = (repo.remove_key(repo.slot.id, current=True).id  # type: ignore[union-attr]
                       if action == "passwd" else None)
            if args.json:
                emit_json({"repo": args.repo, "slot": _slot_doc(slot, None), "removed": removed})
            else:
                print(f"added key slot {slot.id} ({slot.kind}, {slot.access})"
                      + (f"; removed key slot {removed}" if removed else ""))
            return 0
        if action == "remove":
            slot = repo.remove_key(args.slot)
            if args.json:
                emit_json({"repo": args.repo, "removed": slot.id})
            else:
                print(f"removed key slot {slot.id} ({slot.kind}, {slot.access})")
            return 0
        # export --paper
        if not isinstance(repo.keys, MasterKey):
            raise KeyAccessError("a write-only key cannot export the master key: unlock with a full key")
        paper = export_paper(repo.keys)
        if args.json:
            emit_json({"repo": args.repo, "paper_key": paper})
        else:
            print(paper)
            print("this opens every backup in the repository: print it, store it offline, delete any copy; "
                  "recover with 'fleece key add --paper-key-file FILE'", file=sys.stderr)
        return 0
