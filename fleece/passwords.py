"""The CLI's side of credentials: flags first, then the environment, then — on a terminal only — a prompt.

The core (``repository.credentials``) knows the environment variables; flags and prompts are the
command line's. A prompt never appears in a script: without a terminal and without a credential,
the core's one-line error says which variables to set.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable

from fleece.repository.credentials import (KEYFILE, PAPER, Credential, from_environment, key_file, passphrase,
                                           passphrase_from, password_file, read_secret_file)
from fleece.repository.errors import UsageError

NEW_PASSWORD_VARIABLES = ("FLEECE_NEW_PASSWORD", "FLEECE_NEW_PASSWORD_FILE", "FLEECE_NEW_PASSWORD_COMMAND")


def add_credential_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-file", metavar="FILE",
                   help="read the repository password from FILE (else FLEECE_PASSWORD, FLEECE_PASSWORD_FILE, "
                        "FLEECE_PASSWORD_COMMAND, or a prompt on a terminal)")
    p.add_argument("--key-file", metavar="FILE", help="unlock with a key file (≥ 32 random bytes) instead of a "
                                                      "password (else FLEECE_KEY_FILE)")


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def credential_source(args: argparse.Namespace) -> Callable[[bool], Credential | None]:
    """What opens the repository of *args*, asked for only if it is encrypted. For a repository being
    created (*new*) a prompt asks twice."""

    def get(new: bool) -> Credential | None:
        paper = getattr(args, "paper_key_file", None)
        given = [flag for flag, value in (("--password-file", args.password_file), ("--key-file", args.key_file),
                                          ("--paper-key-file", paper)) if value is not None]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} both name a credential: give one")
        if args.key_file is not None:
            return key_file(args.key_file, "--key-file")
        if args.password_file is not None:
            return password_file(args.password_file, "--password-file")
        if paper is not None:
            return Credential(PAPER, read_secret_file(paper, "--paper-key-file"), f"--paper-key-file {paper}")
        found = from_environment()
        if found is not None or not interactive():
            return found
        if new:
            return passphrase(ask_twice(f"new password for {args.repo}: "), "prompt")
        return passphrase(ask(f"password for {args.repo}: "), "prompt")

    return get


def ask(prompt: str) -> bytes:
    """What the person types (no echo); :func:`passphrase` refuses it if empty."""
    return getpass.getpass(prompt, stream=sys.stderr).encode()


def ask_twice(prompt: str) -> bytes:
    first = ask(prompt)
    if getpass.getpass("again: ", stream=sys.stderr).encode() != first:
        raise UsageError("the two passwords differ: nothing was changed")
    return first


def new_credential(args: argparse.Namespace) -> Credential:
    """The secret of a new key slot: ``--new-key-file`` (made if missing), ``--new-password-file``,
    ``FLEECE_NEW_PASSWORD``/``_FILE``/``_COMMAND``, or a prompt on a terminal (twice)."""
    if args.new_key_file is not None and args.new_password_file is not None:
        raise UsageError("--new-key-file and --new-password-file both name the new secret: give one")
    if args.new_key_file is not None:
        path = args.new_key_file
        if not os.path.exists(path):
            make_key_file(path)
        return key_file(path, "--new-key-file")
    if args.new_password_file is not None:
        return password_file(args.new_password_file, "--new-password-file")
    found = passphrase_from(os.environ, NEW_PASSWORD_VARIABLES)  # type: ignore[arg-type]
    if found is not None:
        return found
    if not interactive():
        raise UsageError("no new password given: set FLEECE_NEW_PASSWORD (or FLEECE_NEW_PASSWORD_FILE / "
                         "FLEECE_NEW_PASSWORD_COMMAND), pass --new-password-file or --new-key-file, or run on a "
                         "terminal to be asked")
    return passphrase(ask_twice("new password: "), "prompt")


def make_key_file(path: str) -> None:
    """Write 64 random bytes to a new file only its owner can read (never over an existing file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        os.write(fd, os.urandom(64))
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["KEYFILE", "add_credential_args", "credential_source", "new_credential"]
