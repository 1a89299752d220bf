"""``fleece`` command line (DESIGN.md §3 is the contract: commands, flags and ``--json`` fields only grow).

Exit codes: 0 ok, 1 failure, 2 usage error. With ``--json`` exactly one JSON document goes to stdout;
log lines and progress go to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fleece.repository.errors import FleeceError, UsageError

from . import __version__
from .commands import COMMANDS
from .output import setup_logging

log = logging.getLogger("fleece")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors: keep that, shorten the text
        self.print_usage(sys.stderr)
        sys.stderr.write(f"fleece: error: {message}\n")
        sys.exit(2)


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
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    signal.signal(signal.SIGTERM, _terminate)
    run: Callable[[argparse.Namespace], Any] = COMMANDS[args.command][2]
    try:
        return int(run(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"fleece: error: {exc}\n")
        return 2
    except FleeceError as exc:
        sys.stderr.write(f"fleece: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("fleece: interrupted; everything was rolled back\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
