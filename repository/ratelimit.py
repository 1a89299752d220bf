"""Token bucket for ``--bwlimit``: caps the bytes per second written to the repository.

Thin uplinks are the reason this exists, so the limit applies to what is actually sent (compressed pack
bytes, index, manifest), not to what is read from the disk. Callers consume in pieces of at most
``burst`` bytes so that the link sees a steady stream instead of pack-sized bursts.
"""

from __future__ import annotations

import re
import threading
import time

from .errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_rate(text: str) -> int:
    """Parse ``20M``, ``512K``, ``1.5G`` or a plain number of bytes per second (suffixes are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot parse rate {text!r}: use bytes per second with an optional K/M/G suffix, "
                         "e.g. --bwlimit 20M")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"rate {text!r} must be positive")
    return value


class TokenBucket:
    """Thread-safe token bucket; :meth:`consume` blocks until the bytes may be sent."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.burst = max(64 << 10, burst if burst is not None else min(rate // 4, 4 << 20))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> None:
        while nbytes > 0:
            piece = min(nbytes, self.burst)
            self._take(piece)
            nbytes -= piece

    def _take(self, n: int) -> None:
        with self._lock:  # serialises waiters: tokens are handed out in arrival order
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < n:
                time.sleep((n - self._tokens) / self.rate)
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
            self._tokens -= n
