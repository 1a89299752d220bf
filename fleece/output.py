"""How the command talks to people and scripts: one JSON document on stdout with ``--json``, short human
lines otherwise, log lines and progress on stderr (progress only when stderr is a terminal)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fleece: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "qemu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A byte-count progress bar on stderr (tqdm), silent when stderr is not a TTY."""

    def __init__(self, desc: str, total: int | None = None) -> None:
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, nbytes: int, total: int | None = None) -> None:
        if self._bar is not None:
            if total is not None and self._bar.total != total:
                self._bar.total = total
                self._bar.refresh()
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
