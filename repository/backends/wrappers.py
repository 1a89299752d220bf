"""Backends that wrap a backend: retry, rate limiting and request counting, each a layer of its own.

Modelled on restic's ``internal/backend/retry`` and ``internal/backend/limiter``: a wrapper *is* a
:class:`~.base.Backend` and delegates the six operations (and ``close``, ``location``, ``parallelism``) to
the backend inside it, adding one concern. So a concern is written once for every kind of storage, a
storage backend only talks to its storage, and tests can slide a fault-injecting layer anywhere in the
stack. :func:`compose` builds the one stack a repository is opened with (outermost first)::

    Retrying ▸ RateLimited (only with a bandwidth limit) ▸ Counting ▸ LocalBackend | S3Backend

Retrying is outermost so that every attempt goes through the limiter (a retried upload uses the link as
much as the first one did) and is counted (the counts are what was really asked of the storage).

:meth:`~.base.Backend.cancel` goes down the whole stack: Retrying and RateLimited wake the operations
waiting in them (a back-off, a ``--bwlimit`` pause), which raise :class:`~repository.errors.Interrupted`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import TransientBackendError
from ..ratelimit import Pauses, TokenBucket
from ..spill import data_size
from .base import Backend, Data, ObjectInfo, RangeReader

log = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W", bound=Backend)

DEFAULT_ATTEMPTS = 8
#: Seconds after which one operation stops being retried, however many attempts are left (see Retrying).
DEFAULT_DEADLINE = 300.0


class BackendWrapper(Backend):
    """A backend that passes everything to *inner*; subclasses override what they add to."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property  # type: ignore[override]
    def location(self) -> str:
        return self.inner.location

    @property  # type: ignore[override]
    def parallelism(self) -> int:
        return self.inner.parallelism

    def put(self, name: str, data: Data) -> None:
        self.inner.put(name, data)

    def put_if_absent(self, name: str, data: Data) -> bool:
        return self.inner.put_if_absent(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def head(self, name: str) -> ObjectInfo:
        return self.inner.head(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def delete_many(self, names: Sequence[str]) -> None:
        self.inner.delete_many(names)

    @property  # type: ignore[override]
    def object_lock(self) -> tuple[str, int] | None:
        return self.inner.object_lock

    def set_object_lock(self, mode: str, days: int) -> None:
        self.inner.set_object_lock(mode, days)

    def extend_lock(self, name: str, until: float) -> None:
        self.inner.extend_lock(name, until)

    def close(self) -> None:
        self.inner.close()

    def cancel(self) -> None:
        self.inner.cancel()

    def discard_location(self) -> None:
        self.inner.discard_location()


def layer(backend: Backend, kind: type[W]) -> W | None:
    """The outermost layer of class *kind* in a stack of wrappers (None when the stack has none)."""
    b: Backend | None = backend
    while b is not None:
        if isinstance(b, kind):
            return b
        b = b.inner if isinstance(b, BackendWrapper) else None
    return None


# -- retry ----------------------------------------------------------------------------------------------

class Retrying(BackendWrapper):
    """Retries :class:`TransientBackendError` — and nothing else — a bounded number of times.

    The pause before attempt *n + 1* is drawn uniformly from ``[0, min(backoff_cap, backoff · 2ⁿ⁻¹)]``
    ("full jitter"): many writers that failed together do not come back together. Permanent errors,
    missing objects and programming errors pass through at once. After the last attempt the error says
    how many attempts were made and what to check; its fields (``code``, ``status``, ``object``) are the
    last failure's.

    Besides *attempts*, an operation has a *deadline*: no retry starts once it has been failing for that
    many seconds (default :data:`DEFAULT_DEADLINE`, 5 min; None: attempts only). Attempts alone do not
    bound the time — against a server that accepts connections and never answers, each attempt lasts a
    whole read timeout (S3: 60 s), and 8 of them would stall a run for 8 min before it said anything.
    Five minutes ride out what is worth riding out (an RGW restart, a flapping link, a throttling burst)
    and no more; the worst case is the deadline plus one attempt. The attempts stay the bound for fast
    failures (a refused connection fails 8 times within seconds), ``FLEECE_S3_ATTEMPTS`` sets them.

    ``put`` and ``delete`` are idempotent, reads have no effect: retrying them is always safe. A listing
    that fails part-way is listed again and names already yielded are skipped (restic does the same), so
    a caller sees each object once. ``put_if_absent`` needs care, see :meth:`put_if_absent`.

    The pauses are cut short by :meth:`cancel` (:class:`~repository.errors.Interrupted`; a cancelled
    operation does not retry again) — with the real clock; an injected *sleep* is called as it is, after
    the same check.

    :param sleep: *clock* and *rng* are for tests (no real waiting, a clock that jumps, reproducible jitter).
    """

    def __init__(self, inner: Backend, attempts: int = DEFAULT_ATTEMPTS, *, backoff: float = 0.25,
                 backoff_cap: float = 8.0, deadline: float | None = DEFAULT_DEADLINE,
                 sleep: Callable[[float], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        super().__init__(inner)
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.deadline = deadline
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._pauses = Pauses()

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number *attempt* (1-based)."""
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff * 2 ** (attempt - 1)))

    def cancel(self) -> None:
        self._pauses.cancel()
        super().cancel()

    def _start(self) -> tuple[int, float]:
        """What an operation remembers from its start: the cancel epoch and the time."""
        return self._pauses.epoch(), self._clock()

    def _pause_or_give_up(self, exc: TransientBackendError, attempt: int, what: str,
                          started: tuple[int, float]) -> None:
        epoch, since = started
        pause = self.delay(attempt)
        elapsed = self._clock() - since
        out_of_time = self.deadline is not None and elapsed + pause > self.deadline
        if attempt >= self.attempts or out_of_time:
            plural = "s" if attempt != 1 else ""
            took = f" in {elapsed:.0f} s" if out_of_time else ""
            raise TransientBackendError(
                f"{exc.message} — gave up after {attempt} attempt{plural}{took}: check that the storage at "
                f"{self.location} is up and reachable, then run again",
                object=exc.object, code=exc.code, status=exc.status) from exc
        log.info("%s failed (attempt %d of %d), retrying in %.2f s: %s", what, attempt, self.attempts, pause, exc)
        if self._sleep is None:
            self._pauses.sleep(pause, epoch)
        else:
            self._pauses.sleep_until(0.0, epoch)  # raises if cancelled: the same check as a real pause
            self._sleep(pause)

    def call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        """Run *fn* under this policy; also for a backend's own set-up requests (S3's bucket check)."""
        started = self._start()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except TransientBackendError as exc:
                self._pause_or_give_up(exc, attempt, f"{op} {name}", started)

    def put(self, name: str, data: Data) -> None:
        self.call("put", name, lambda: self.inner.put(name, data))

    def put_if_absent(self, name: str, data: Data) -> bool:
        """Create-if-absent, retried without ever mistaking our own write for someone else's.

        The hazard: attempt 1 creates the object but its reply is lost (a reset, a timeout); attempt 2
        then finds the object there and would answer "it already existed" — a caller committing a
        manifest would think another writer won. So when any attempt failed transiently and a later
        one finds the object present, the object is read back: if it holds exactly *data*, this call
        created it and returns True; otherwise someone else's object is there and it returns False.
        The one case this cannot tell apart — another writer stored the very same bytes under the very
        same name — is harmless: the object holds what each of them meant to store. (Repository names
        are content-derived or carry a random part, so it does not arise in practice.) The read-back
        costs a request only after a failure, never on the common path.
        """
        failed = [False]

        def attempt() -> bool:
            try:
                return self.inner.put_if_absent(name, data)
            except TransientBackendError:
                failed[0] = True
                raise

        created = self.call("put_if_absent", name, attempt)
        if created or not failed[0]:
            return created
        want = memoryview(data).cast("B")
        if self.head(name).size != want.nbytes:
            return False
        return self.get(name) == want

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.call("get", name, lambda: self.inner.get(name, offset, length))

    def head(self, name: str) -> ObjectInfo:
        return self.call("head", name, lambda: self.inner.head(name))

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        return _ResumingRange(self, name, offset, length)

    def delete(self, name: str) -> None:
        self.call("delete", name, lambda: self.inner.delete(name))

    def extend_lock(self, name: str, until: float) -> None:
        self.call("put", name, lambda: self.inner.extend_lock(name, until))

    def delete_many(self, names: Sequence[str]) -> None:
        if names:  # deleting is idempotent: a retried batch whose first attempt landed is no harm
            self.call("delete", names[0], lambda: self.inner.delete_many(names))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        seen: set[str] = set()
        started = self._start()
        attempt = 0
        while True:
            attempt += 1
            try:
                for info in self.inner.list(prefix):
                    if info.name not in seen:
                        seen.add(info.name)
                        yield info
                return
            except TransientBackendError as exc:
                self._pause_or_give_up(exc, attempt, f"list {prefix or '/'}", started)


class _ResumingRange(RangeReader):
    """A range read under the retry policy: a failure opening it or in the middle of its body opens the
    rest of the range again (one policy — attempts and deadline — for the whole range)."""

    def __init__(self, policy: Retrying, name: str, offset: int, length: int) -> None:
        self._policy, self._name = policy, name
        self._pos, self._end = offset, offset + length
        self._started = policy._start()
        self._attempt = 0
        self._inner: RangeReader | None = None
        self._open()

    def _open(self) -> None:
        while True:
            self._attempt += 1
            try:
                self._inner = self._policy.inner.open_range(self._name, self._pos, self._end - self._pos)
                return
            except TransientBackendError as exc:
                self._policy._pause_or_give_up(exc, self._attempt, f"get {self._name}", self._started)

    def readinto(self, out: memoryview) -> int:
        done = 0
        while done < len(out) and self._pos < self._end:
            assert self._inner is not None
            try:
                n = self._inner.readinto(out[done:])
            except TransientBackendError as exc:
                self._inner.close()
                self._inner = None
                self._policy._pause_or_give_up(exc, self._attempt, f"get {self._name}", self._started)
                self._open()
                continue
            if n == 0:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None


# -- rate limiting ---------------------------------------------------------------------------------------

class RateLimited(BackendWrapper):
    """Paces the bytes *sent* (``put``/``put_if_absent`` data) with a :class:`TokenBucket` (``--bwlimit``).

    The tokens for an object are taken before it goes out, so the average rate is exact and a burst is
    at most one object (a pack: 16–32 MiB). Shaping inside an object would need a streaming interface;
    the backends take whole buffers (S3 signs a PUT over the whole body, reading it twice over HTTP, so
    pacing inside the body would count it twice anyway). Reads are not limited: the limit exists for
    thin uplinks. Thread-safe: parallel uploads share the one bucket. :meth:`cancel` wakes the uploads
    waiting for their tokens (:class:`~repository.errors.Interrupted`); they give the tokens back.
    """

    def __init__(self, inner: Backend, rate: int | TokenBucket) -> None:
        super().__init__(inner)
        self.bucket = rate if isinstance(rate, TokenBucket) else TokenBucket(rate)

    def cancel(self) -> None:
        self.bucket.cancel()
        super().cancel()

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        return self.inner.open_range(name, offset, length)  # reads are not limited

    def put(self, name: str, data: Data) -> None:
        self.bucket.consume(data_size(data))
        self.inner.put(name, data)

    def put_if_absent(self, name: str, data: Data) -> bool:
        self.bucket.consume(data_size(data))
        return self.inner.put_if_absent(name, data)


# -- counting --------------------------------------------------------------------------------------------

#: The request each operation is, named as S3 names it (and as ``backend_requests`` in ``--json`` reports).
VERBS = {"put": "PUT", "put_if_absent": "PUT", "get": "GET", "head": "HEAD", "list": "LIST", "delete": "DELETE"}


#: the most names one ``delete_many`` request carries (S3's DeleteObjects limit)
BATCH = 1000


def _innermost(backend: Backend) -> Backend:
    while isinstance(backend, BackendWrapper):
        backend = backend.inner
    return backend


class _CountedRange(RangeReader):
    def __init__(self, counter: Counting, inner: RangeReader) -> None:
        self._counter, self._inner = counter, inner

    def readinto(self, out: memoryview) -> int:
        try:
            n = self._inner.readinto(out)
        except BaseException:
            self._counter._done_bytes(0, failed="get")  # a body lost midway: the request failed after all
            raise
        self._counter._done_bytes(n)
        return n

    def close(self) -> None:
        self._inner.close()


class Counting(BackendWrapper):
    """Counts operations (calls that failed too) and the bytes sent and received; thread-safe.

    One operation is one call of the contract: a multipart upload of a big object or a listing that
    takes several pages is one ``put`` / one ``list``. Below :class:`Retrying`, every attempt counts.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._sent = 0
        self._received = 0
        self._written: set[str] = set()

    def written(self) -> set[str]:
        """Names this stack stored (put, or put_if_absent that stored): what a failed run may take back."""
        with self._lock:
            return set(self._written)

    def _wrote(self, name: str) -> None:
        with self._lock:
            self._written.add(name)

    def _done(self, op: str, sent: int = 0, received: int = 0, failed: bool = False) -> None:
        with self._lock:
            self._ops[op] += 1
            self._sent += sent
            self._received += received
            if failed:
                self._errors[op] += 1

    def _done_bytes(self, received: int, failed: str | None = None) -> None:
        """Bytes of a request counted already (a streamed range); *failed*: it failed midway."""
        with self._lock:
            self._received += received
            if failed:
                self._errors[failed] += 1

    def _counted(self, op: str, fn: Callable[[], T], sent: int = 0) -> T:
        try:
            out = fn()
        except BaseException:
            self._done(op, failed=True)
            raise
        self._done(op, sent=sent, received=len(out) if isinstance(out, bytes) else 0)
        return out

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: ``operations`` and ``errors`` by operation, ``requests`` by :data:`VERBS`,
        ``sent_bytes`` and ``received_bytes`` (object data only, not protocol overhead)."""
        with self._lock:
            ops, errors, sent, received = dict(self._ops), dict(self._errors), self._sent, self._received
        requests: Counter[str] = Counter()
        for op, n in ops.items():
            requests[VERBS[op]] += n
        return {"operations": ops, "errors": errors, "requests": dict(requests), "sent_bytes": sent,
                "received_bytes": received}

    def requests(self) -> dict[str, int]:
        """Requests by verb (``PUT``, ``GET``, ``HEAD``, ``LIST``, ``DELETE``)."""
        return self.snapshot()["requests"]

    def put(self, name: str, data: Data) -> None:
        self._counted("put", lambda: self.inner.put(name, data), data_size(data))
        self._wrote(name)

    def put_if_absent(self, name: str, data: Data) -> bool:
        stored = self._counted("put_if_absent", lambda: self.inner.put_if_absent(name, data), data_size(data))
        if stored:
            self._wrote(name)
        return stored

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._counted("get", lambda: self.inner.get(name, offset, length))

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        """One ``get`` (its request), whose bytes are counted as they are read."""
        reader = self._counted("get", lambda: self.inner.open_range(name, offset, length))
        return _CountedRange(self, reader)

    def head(self, name: str) -> ObjectInfo:
        return self._counted("head", lambda: self.inner.head(name))

    def delete(self, name: str) -> None:
        self._counted("delete", lambda: self.inner.delete(name))

    def delete_many(self, names: Sequence[str]) -> None:
        # a batch is one request where the storage takes batches (S3), else one per name
        batched = type(_innermost(self.inner)).delete_many is not Backend.delete_many
        for i in range(0, len(names), BATCH if batched else 1):
            part = names[i:i + (BATCH if batched else 1)]
            self._counted("delete", lambda part=part: self.inner.delete_many(part))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            yield from self.inner.list(prefix)
        except GeneratorExit:  # the caller stopped reading: not a failure
            self._done("list")
            raise
        except BaseException:
            self._done("list", failed=True)
            raise
        self._done("list")


# -- the stack ---------------------------------------------------------------------------------------------

def compose(backend: Backend, *, attempts: int | None = None, bwlimit: int | None = None) -> Retrying:
    """The stack a repository is opened with (see the module docstring for the order and why)."""
    inner: Backend = Counting(backend)
    if bwlimit:
        inner = RateLimited(inner, bwlimit)
    return Retrying(inner, attempts or DEFAULT_ATTEMPTS)
