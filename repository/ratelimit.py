"""Token bucket for ``--bwlimit``: caps the bytes per second written to the repository.

Thin uplinks are the reason this exists, so the limit applies to what is actually sent (compressed pack
bytes, index, manifest), not to what is read from the disk. Callers consume in pieces of at most
``burst`` bytes so that the link sees a steady stream instead of pack-sized bursts.
"""

from __future__ import annotations

import re
import threading
import time

from .errors import Interrupted, UsageError

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


class Pauses:
    """Timed waits that :meth:`cancel` cuts short: the rate limiter's and the retry back-off's.

    Both wait inside an upload worker while the main thread, unwinding from Ctrl-C or SIGTERM, waits for
    that worker to leave: a plain ``time.sleep`` there (hours, at ``--bwlimit 1``) would hold the run
    hostage. A waiter takes an :meth:`epoch` when its operation starts; :meth:`cancel` starts a new
    epoch and wakes everyone, so the waits of operations begun before it raise
    :class:`~repository.errors.Interrupted` — at once, and at every later wait of the same operation —
    while operations begun afterwards (the clean-up of the failed run) wait normally again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._epoch = 0

    def epoch(self) -> int:
        with self._cond:
            return self._epoch

    def sleep_until(self, deadline: float, epoch: int) -> None:
        """Wait until ``time.monotonic()`` reaches *deadline*; raise Interrupted once *epoch* was cancelled
        (even when there is nothing left to wait for: the operation was cancelled)."""
        with self._cond:
            while True:
                if self._epoch != epoch:
                    raise Interrupted("interrupted while waiting to retry or for the bandwidth limit")
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def sleep(self, seconds: float, epoch: int) -> None:
        self.sleep_until(time.monotonic() + seconds, epoch)

    def cancel(self) -> None:
        """Interrupt every wait of an operation that started before now."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()


class TokenBucket:
    """Thread-safe token bucket; :meth:`consume` blocks until the bytes may be sent, :meth:`cancel` makes
    the calls waiting now raise :class:`~repository.errors.Interrupted` (see :class:`Pauses`).

    Each piece reserves its tokens on arrival — the balance may go negative, a debt the waiters pay off
    in turn — and then waits outside the lock until its share has accrued. So tokens are handed out in
    arrival order (as when waiters queued on the lock) and a wait can be cut short. A cancelled piece
    gives its tokens back: the run's clean-up afterwards does not pay for uploads that never happened.
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.burst = max(64 << 10, burst if burst is not None else min(rate // 4, 4 << 20))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self._pauses = Pauses()

    def consume(self, nbytes: int) -> None:
        epoch = self._pauses.epoch()
        while nbytes > 0:
            piece = min(nbytes, self.burst)
            self._take(piece, epoch)
            nbytes -= piece

    def cancel(self) -> None:
        self._pauses.cancel()

    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return now

    def _take(self, n: int, epoch: int) -> None:
        with self._lock:
            now = self._refill()
            self._tokens -= n
            ready = now + max(0.0, -self._tokens) / self.rate
        try:
            self._pauses.sleep_until(ready, epoch)
        except Interrupted:
            with self._lock:
                self._refill()
                self._tokens = min(self.burst, self._tokens + n)
            raise
