"""Where the secret that opens an encrypted repository comes from, restic's way.

Sources, in the order a user would expect (one of the password variables at a time; naming two is a
usage error, not a guess):

* ``FLEECE_KEY_FILE`` — a file of ≥ 32 random bytes for a key-file slot (fast to unlock: HKDF);
* ``FLEECE_PASSWORD`` — the passphrase itself;
* ``FLEECE_PASSWORD_FILE`` — a file whose content (one trailing newline dropped) is the passphrase;
* ``FLEECE_PASSWORD_COMMAND`` — a command (split like a shell would, never run through one) whose
  standard output is the passphrase: a secret manager, ``pass show fleece``.

The CLI adds its own flags and, on a terminal only, a prompt. Nothing here prints. An unencrypted
repository never asks, so these variables are ignored there.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO

from .errors import UsageError

PASSPHRASE = "passphrase"
KEYFILE = "keyfile"
PAPER = "paper"  # the master key as ``fleece key export --paper`` printed it: recovery only

PASSWORD_VARIABLES = ("FLEECE_PASSWORD", "FLEECE_PASSWORD_FILE", "FLEECE_PASSWORD_COMMAND")
COMMAND_TIMEOUT = 120.0
MAX_SECRET = 1 << 20  # a passphrase or key file larger than this is a wrong path, not a secret


@dataclass(frozen=True)
class Credential:
    """A secret and where it came from (for messages: the secret itself is never shown)."""

    kind: str  # PASSPHRASE | KEYFILE | PAPER
    secret: bytes = field(repr=False)
    source: str = ""


def _strip_newline(data: bytes) -> bytes:
    """Drop one trailing newline (``echo pw > file``, a command's last line), nothing else: spaces count."""
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def read_secret_file(path: str, source: str, *, strip: bool = True) -> bytes:
    """The content of a password or key file; a one-line usage error if it cannot be read."""
    if not path:
        raise UsageError(f"{source} is empty: name a file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {source} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET:
        raise UsageError(f"{source} {path} is larger than {MAX_SECRET} bytes: that is not a password or key file")
    return _strip_newline(data) if strip else data


def run_password_command(command: str, source: str) -> bytes:
    """The standard output of *command* (one trailing newline dropped); its failure is a usage error.

    Output is read as it comes and capped: a command that prints megabytes (or never stops: ``yes``) is
    killed and refused, never collected into memory.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"{source} cannot be parsed ({exc})") from None
    if not argv:
        raise UsageError(f"{source} is empty: give a command that prints the password")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise UsageError(f"{source}: command {argv[0]!r} not found") from None
    except OSError as exc:
        raise UsageError(f"{source}: cannot run {argv[0]!r} ({exc.strerror or exc})") from None
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(_read_capped(proc.stderr, 64 << 10)), daemon=True)
    drain.start()
    try:
        timer = threading.Timer(COMMAND_TIMEOUT, proc.kill)
        timer.start()
        try:
            out = _read_capped(proc.stdout, MAX_SECRET + 1)
            if len(out) > MAX_SECRET:
                proc.kill()
                raise UsageError(f"{source}: {argv[0]!r} printed more than {MAX_SECRET} bytes: that is not a password")
            code = proc.wait()
        finally:
            timed_out = not timer.is_alive() and proc.returncode is not None and proc.returncode < 0
            timer.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if timed_out:
        raise UsageError(f"{source}: {argv[0]!r} did not finish within {COMMAND_TIMEOUT:.0f} s")
    if code != 0:
        text = (errors[0] if errors else b"").decode(errors="replace").strip().splitlines()[-1:]
        raise UsageError(f"{source}: {argv[0]!r} failed: {(text or [f'exit status {code}'])[0][:200]}")
    return _strip_newline(out)


def _read_capped(stream: IO[bytes] | None, limit: int) -> bytes:
    """Up to *limit* bytes of *stream* (what is left unread stays in the pipe)."""
    if stream is None:
        return b""
    chunks, size = [], 0
    while size < limit:
        chunk = stream.read1(min(65536, limit - size)) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def key_file(path: str, source: str) -> Credential:
    return Credential(KEYFILE, read_secret_file(path, source, strip=False), f"{source} {path}")


def passphrase(secret: bytes, source: str) -> Credential:
    """A passphrase credential — never an empty one, whatever it came from (a variable, a file, a
    command, a flag): an empty passphrase protects nothing, and taking it would surface later as a
    misleading "wrong password"."""
    if not secret:
        raise UsageError(f"{source} gives an empty password: an empty passphrase cannot protect a repository")
    return Credential(PASSPHRASE, secret, source)


def password_file(path: str, source: str) -> Credential:
    """The passphrase in file *path* (one trailing newline dropped)."""
    return passphrase(read_secret_file(path, source), f"{source} {path}")


def passphrase_from(variables: Mapping[str, str], names: tuple[str, str, str]) -> Credential | None:
    """The passphrase the variables *names* (value, file, command) give, or ``None``."""
    given = [name for name in names if variables.get(name) is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are both set: keep one of them")
    if not given:
        return None
    name = given[0]
    value = variables[name]
    if name == names[0]:
        if not value:
            raise UsageError(f"{name} is set but empty: an empty passphrase cannot protect a repository")
        return passphrase(os.fsencode(value), name)  # the bytes the user set, UTF-8 or not
    if name == names[1]:
        return password_file(value, name)
    return passphrase(run_password_command(value, name), name)


def from_environment(variables: Mapping[str, str] | None = None) -> Credential | None:
    """The credential the environment gives (module docstring), or ``None`` when it gives none."""
    env = os.environ if variables is None else variables
    if env.get("FLEECE_KEY_FILE") is not None:
        if any(env.get(name) is not None for name in PASSWORD_VARIABLES):
            raise UsageError("FLEECE_KEY_FILE and a FLEECE_PASSWORD* variable are both set: keep one of them")
        return key_file(env["FLEECE_KEY_FILE"], "FLEECE_KEY_FILE")
    return passphrase_from(env, PASSWORD_VARIABLES)  # type: ignore[arg-type]


def configured(variables: Mapping[str, str] | None = None) -> list[str]:
    """The credential variables that are set (for the warning a plaintext repository's backup gives when
    the user evidently expects encryption)."""
    env = os.environ if variables is None else variables
    return [name for name in ("FLEECE_KEY_FILE", *PASSWORD_VARIABLES) if env.get(name)]


def kdf_seconds(variables: Mapping[str, str] | None = None, default: float = 0.5) -> float:
    """How long a new passphrase slot's scrypt should take (``FLEECE_KDF_TIME``, milliseconds; like
    cryptsetup's ``--iter-time``). 0 gives scrypt's floor (2^14), never less."""
    env = os.environ if variables is None else variables
    text = env.get("FLEECE_KDF_TIME")
    if text is None or text == "":
        return default
    if not text.strip().isascii() or not text.strip().isdigit() or int(text) > 60000:
        raise UsageError(f"FLEECE_KDF_TIME={text!r} must be whole milliseconds from 0 to 60000")
    return int(text) / 1000
