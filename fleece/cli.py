"""``fleece`` command line (DESIGN.md §3 is the contract: commands, flags and ``--json`` fields only grow).

Exit codes: 0 ok, 1 failure, 2 usage error. With ``--json`` exactly one JSON document goes to stdout;
log lines and progress go to stderr.
"""

from __future__ import annotations

import argparse
import gc
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fleece.repository.errors import FleeceError, HostError, InternalError, Interrupted, UsageError

from . import __version__
from .commands import COMMANDS
from .config import add_config_option, parse_args as parse_with_config
from .output import emit_json, setup_logging, stdout_errors

log = logging.getLogger("fleece")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors: keep that, shorten the text
        raise _ArgumentError(message, self)


class _ArgumentError(Exception):
    """argparse's complaint, carried to :func:`main` so it is reported like every other usage error."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleece", description="Incremental, off-host backups of running QEMU VMs.")
    parser.add_argument("--version", action="version", version=f"fleece {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
        add_config_option(p)  # --config FILE (fleece/config.py): every option of a command, from TOML
    return parser


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: unwind, fold bitmaps back, exit non-zero.
    raise KeyboardInterrupt(f"signal {signum}")


M_ARENA_MAX = -8  # glibc mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas before any worker thread exists.

    fleece runs a dozen threads that each allocate and free MiB-sized buffers; with glibc's default of
    up to 8 arenas per core every thread keeps its own freed memory. Two arenas cut the peak RSS of a
    full backup to S3 by 16–27 MiB (202 vs 218 MiB at 4 workers, 217 vs 244 at 8) at the same speed.
    ``MALLOC_ARENA_MAX`` in the environment still wins; on a libc without ``mallopt`` nothing happens.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends here as one line on stderr (and one JSON document with --json).

    No traceback reaches the user: fleece's own errors carry their message and exit code
    (repository/errors.py), an OSError becomes its one-line strerror with the path, and anything else is
    reported as an internal error (its traceback only with -v, for a bug report).
    """
    limit_malloc_arenas()
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in argv
    try:
        args = parse_with_config(build_parser, argv)
    except _ArgumentError as exc:
        if not wants_json:
            exc.parser.print_usage(sys.stderr)
        return _fail(UsageError(str(exc)), wants_json)
    except UsageError as exc:  # the --config file: unreadable, not TOML, an unknown key or a bad value
        return _fail(exc, wants_json)
    setup_logging(-1 if args.quiet else args.verbose)
    signal.signal(signal.SIGTERM, _terminate)
    run: Callable[[argparse.Namespace], Any] = COMMANDS[args.command][2]
    try:
        return _run(run, args)
    except KeyboardInterrupt:  # another Ctrl-C while the first was being reported: it was reported
        _ignore_signals()
        return Interrupted.exit
    finally:
        # the command is over: interpreter exit then skips collecting every object left (boto3's model
        # graph made exit take 0.26–0.39 s per S3 command here, 0.02 s frozen)
        gc.freeze()


def _ignore_signals() -> None:
    """The run has unwound and is only reporting: more Ctrl-Cs must not kill it by signal (exit 130)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _run(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    try:
        code = int(run(args) or 0)
        _flush_stdout()
        return code
    except FleeceError as exc:
        return _fail(exc, args.json, args.command in LINE_COMMANDS)
    except KeyboardInterrupt:
        _ignore_signals()
        return _fail(Interrupted(INTERRUPTED.get(args.command, "interrupted")), args.json,
                     args.command in LINE_COMMANDS)
    except BrokenPipeError:  # `fleece list | head`: the reader is gone, nothing more to say
        _silence_stdout()
        return 1
    except OSError as exc:
        return _fail(_os_error(exc), args.json)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        log.debug("internal error", exc_info=True)
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        hint = "" if args.verbose else " (run again with -v for details)"
        return _fail(InternalError(f"internal error: {what}{hint}; please report it"), args.json)


#: What an interrupted command leaves (each unwinds before it exits).
INTERRUPTED = {
    "backup": "interrupted; everything was rolled back (the VM keeps running, no point was written)",
    "restore": "interrupted; no image was put in place: run the same restore with --resume to continue it "
               "(its partial images are kept in --out), or without to start over",
    "init": "interrupted",
    "live-restore": "interrupted; the images are intact (with what the guest wrote) but still read what was not "
                    "copied from the server, which stopped: shut the VM down and restore the point",
    "key": "interrupted; a key slot already added stays ('fleece key list' shows the slots)",
    "forget": "interrupted; the points already removed are gone, every other point is intact (run forget again)",
    "prune": "interrupted; nothing a point needs was deleted (run prune again to finish)",
}


def _os_error(exc: OSError) -> FleeceError:
    """An operating-system failure fleece did not classify itself, as one line naming the path."""
    where = f": {exc.filename}" if exc.filename else ""
    return HostError(f"{exc.strerror or exc}{where}", object=str(exc.filename) if exc.filename else None)


#: commands that print JSON lines while they run (serve: ready; live-restore: ready, done): their error
#: document is one line too, so a script reading lines gets it whole
LINE_COMMANDS = ("serve", "live-restore", "mount")


def _fail(exc: FleeceError, as_json: bool, one_line: bool = False) -> int:
    message = " ".join(str(exc).split())  # one line, whatever QEMU or a server put into the text
    sys.stderr.write(f"fleece: error: {message}\n")
    if as_json:
        doc = exc.to_json()
        doc["error"]["message"] = message
        try:
            emit_json(doc, one_line=one_line)
            sys.stdout.flush()
        except (OSError, ValueError, FleeceError):  # stdout closed, full or gone: stderr said it all
            _silence_stdout()
    return exc.exit


def _flush_stdout() -> None:
    """Flush now, so that a closed or full stdout is reported as one line (not at interpreter exit)."""
    with stdout_errors():
        if sys.stdout is not None:
            sys.stdout.flush()


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if sys.stdout is not None:
            try:
                os.dup2(devnull, sys.stdout.fileno())
                return
            except (OSError, ValueError):
                pass
        sys.stdout = open(devnull, "w")  # noqa: SIM115 - lives until exit
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
