"""fleece's one executor: a bounded, closable work queue and the worker pool built on it.

Every parallel stage of fleece has the same shape — NBD readers, zstd encoders, pack uploads, restore
fills, verify reads, the index rebuild: a producer feeds a bounded queue, N threads consume it, and each
thread owns resources that must not be shared (a libnbd connection, a zstd context, a connection to the
restore target). This module is that shape, once:

* :class:`WorkQueue` — ``put`` blocks while the queue is full, ``get`` while it is empty.
  :meth:`~WorkQueue.close` wakes every blocked producer and consumer at once, and both then raise
  :class:`Closed`. Waiting is on condition variables only — never a loop of short timeouts — so
  cancelling costs no latency and an idle pipeline no wake-ups.
* :class:`Workers` — a queue plus threads whose handlers a *factory* builds inside each thread. The first
  error of any worker closes the queue (waking everyone) and is re-raised, as the very object the worker
  raised (its fleece class intact), by :meth:`~Workers.submit` and :meth:`~Workers.finish`; later errors
  of the same run are only logged. :meth:`~Workers.abort` — what leaving a ``with`` block by an exception
  does — closes and joins without raising, so it never hides the exception on its way out.

Why not ``concurrent.futures``: its queue is unbounded (memory would grow with the disk), a thread that
waits on something else cannot be woken when the run is cancelled, and per-thread resources need
thread-locals that outlive the pool. The model is ovirt-imageio's client ``_io`` module (a closable queue
and one handler per worker).

Handlers
--------
``factory()`` runs in the worker thread and returns the handler: a callable taking one item. A handler
may also have ``finish()``, run once the input has ended and all its items are handled (complete what
it still holds), and ``close()``, run whatever happened (release what it owns). An exception from any
of them is the worker's error. :class:`Closed` escaping a handler ends the worker quietly only if its
run was cancelled; otherwise it is an error like any other (a stray ``Closed`` must never drop work).

A handler that blocks on another queue (a shared buffer pool, say) passes its pool as ``cancel`` to
:meth:`WorkQueue.get` and has that queue woken by the pool's close: ``pool.on_close(other.wake)``.

KeyboardInterrupt reaches only the main thread. It interrupts a blocked :meth:`~Workers.submit` or
:meth:`~Workers.finish` (lock waits are interruptible), the pool is aborted on the way out, and every
worker leaves after the item at hand.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Builds one worker's handler, in that worker's thread.
Factory = Callable[[], Callable[[T], None]]


class Closed(Exception):
    """Internal signal: the queue was closed (its run failed or is cancelled) or takes no more items.

    Never meant for a user: whoever closes a queue has the real reason (the first error, or the
    KeyboardInterrupt that started the unwinding) and raises that.
    """


class Ended(Exception):
    """Internal: :meth:`WorkQueue.get` found the input ended and nothing left to take."""


class Closable(Protocol):
    """Anything whose closing cancels a wait: a :class:`WorkQueue` or a :class:`Workers` pool."""

    @property
    def closed(self) -> bool: ...

    def on_close(self, callback: Callable[[], None]) -> None: ...


class WorkQueue(Generic[T]):
    """A FIFO of at most *maxsize* items that can be ended (no more input) or closed (cancelled).

    Closing drops the queued items: a cancelled run does no more work.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"a work queue holds at least one item, not {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._ended = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Append *item*, waiting while the queue is full; :class:`Closed` once closed or ended."""
        with self._lock:
            while not (self._closed or self._ended) and len(self._items) >= self.maxsize:
                self._not_full.wait()
            if self._closed or self._ended:
                raise Closed
            self._items.append(item)
            self._not_empty.notify()

    def get(self, cancel: Closable | None = None) -> T:
        """Take the oldest item, waiting while there is none.

        Raises :class:`Closed` when this queue — or *cancel* — is closed (*cancel* must wake this queue
        when it closes, see :meth:`wake`), and :class:`Ended` when the input ended and all is taken.
        """
        with self._lock:
            while not (self._items or self._closed or self._ended or (cancel is not None and cancel.closed)):
                self._not_empty.wait()
            if self._closed or (cancel is not None and cancel.closed):
                if self._items:
                    self._not_empty.notify()  # the wake-up this consumer got belongs to another one
                raise Closed
            if not self._items:
                raise Ended
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def __iter__(self) -> Iterator[T]:
        """Every item until the input ends; :class:`Closed` if the queue is closed first."""
        while True:
            try:
                item = self.get()
            except Ended:
                return
            yield item

    def end(self) -> None:
        """No more items will come: consumers take what is left, then :meth:`get` raises :class:`Ended`."""
        with self._lock:
            self._ended = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def close(self) -> None:
        """Cancel: drop the queued items, wake every waiter at once, run the :meth:`on_close` callbacks."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def wake(self) -> None:
        """Make every waiting consumer re-check its ``cancel`` (the callback a cancelling pool calls)."""
        with self._lock:
            self._not_empty.notify_all()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call *callback* (without arguments, in the closing thread) when the queue closes; now if it is."""
        with self._lock:
            if not self._closed:
                self._callbacks.append(callback)
                return
        callback()


class _Run:
    """What linked pools share: whether the run is cancelled, and its first error."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> bool:
        """Record *exc* if it is the run's first error; returns whether it was."""
        with self.lock:
            self.cancelled = True
            if self.error is not None:
                return False
            self.error = exc
            return True


class Workers(Generic[T]):
    """*workers* threads handling the items of one bounded queue (*depth* items, default 2 per worker).

    Threads start with :meth:`start` (or on entering a ``with`` block, which then finishes on a normal exit
    and aborts on an exception). Items are handled in queue order, each by whichever worker is free.
    """

    def __init__(self, factory: Factory[T], *, workers: int, depth: int | None = None,
                 name: str = "fleece-worker") -> None:
        self.name = name
        self.queue: WorkQueue[T] = WorkQueue(depth if depth is not None else 2 * max(1, workers))
        self._factory = factory
        self._count = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._running: set[threading.Thread] = set()  # threads not yet through _work
        self._done = threading.Condition()
        self._start_lock = threading.Lock()
        self._started = False
        self._run = _Run()

    # -- state ------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the run was cancelled or failed (not merely finished)."""
        return self._run.cancelled or self.queue.closed

    @property
    def idle(self) -> bool:
        """Whether no worker thread runs (none started, or every one has left): what the items' resources
        may be released after."""
        with self._done:
            return not self._running

    @property
    def error(self) -> BaseException | None:
        """The run's first error, if any."""
        return self._run.error

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call *callback* when this pool is closed (a failure, :meth:`close` or :meth:`abort`)."""
        self.queue.on_close(callback)

    def link(self, other: Workers[Any]) -> None:
        """Make *other* a stage of this pool's run: closing either closes both, and both report the first
        error of either. Call before either starts."""
        other._run = self._run
        self.on_close(other.close)
        other.on_close(self.close)

    # -- control ----------------------------------------------------------------------------------------

    def start(self) -> Workers[T]:
        """Start the threads (once; later calls do nothing)."""
        with self._start_lock:
            if self._started:
                return self
            self._started = True
            try:
                for i in range(self._count):
                    t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                    with self._done:
                        self._running.add(t)
                    try:
                        t.start()
                    except BaseException:
                        with self._done:
                            self._running.discard(t)
                        raise
                    self._threads.append(t)
            except BaseException:
                self.abort()
                raise
        return self

    def submit(self, item: T) -> None:
        """Queue *item*, waiting while the queue is full. Raises the run's first error once it failed
        (also to a producer that was waiting), :class:`Closed` if it was cancelled without one."""
        try:
            self.queue.put(item)
            return
        except Closed:
            pass
        self._raise_error()  # outside the except block: the worker's error keeps its own context
        raise Closed

    def finish(self) -> None:
        """No more items: wait until every item is handled and every worker has left; raise the first error.

        Interrupted while waiting (Ctrl-C), it aborts the pool before the interruption goes on.
        """
        self.queue.end()
        try:
            self._join()
        except BaseException:
            self.abort()
            raise
        self._raise_error()

    def close(self) -> None:
        """Cancel the run without waiting: queued items are dropped, every waiter wakes."""
        with self._run.lock:
            self._run.cancelled = True
        self.queue.close()

    def abort(self) -> None:
        """Cancel the run and wait for every worker to leave (after its current item). Never raises the
        workers' error: it is for unwinding, when another exception is already on its way."""
        self.close()
        self._join()

    def __enter__(self) -> Workers[T]:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    # -- inside -----------------------------------------------------------------------------------------

    def _raise_error(self) -> None:
        err = self._run.error
        if err is not None:
            raise err

    def _join(self) -> None:
        # Wait on our own condition, not Thread.join(): on CPython 3.11 a join interrupted by Ctrl-C can
        # mark a thread that still runs as stopped (bpo-45274's clean-up), and every later join returns
        # at once. Joining only threads that are through _work keeps the threads' ends exact.
        me = threading.current_thread()
        with self._done:
            while self._running - {me}:
                self._done.wait()
        for t in self._threads:
            if t is not me:
                t.join()

    def _fail(self, exc: BaseException) -> None:
        if self._run.fail(exc):
            log.debug("%s failed: %r", self.name, exc)
        else:
            log.debug("%s: later error after the first: %r", self.name, exc)
        self.queue.close()

    def _work(self) -> None:
        try:
            self._handle_all()
        finally:
            with self._done:
                self._running.discard(threading.current_thread())
                self._done.notify_all()

    def _handle_all(self) -> None:
        handler: Callable[[T], None] | None = None
        try:
            handler = self._factory()
            for item in self.queue:
                handler(item)
            finish = getattr(handler, "finish", None)
            if finish is not None:
                finish()
        except Closed as exc:
            if not self.closed:  # not this run's cancellation: some other queue leaked it
                self._fail(exc)
        except BaseException as exc:  # noqa: BLE001 - the caller gets it from submit()/finish()
            self._fail(exc)
        finally:
            close = getattr(handler, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as exc:  # noqa: BLE001
                    self._fail(exc)


def run_all(items: Iterable[T], factory: Factory[T], *, workers: int, name: str,
            depth: int | None = None, on_close: Callable[[], None] | None = None) -> None:
    """Handle every item of *items* on a pool of *workers* threads (no more threads than items).

    Returns when all are handled; raises the first worker error (then the rest is dropped). *on_close*
    runs when the pool is closed early (an error, Ctrl-C): e.g. the backend's ``cancel``, so that a
    worker waiting in a retry back-off leaves at once."""
    if isinstance(items, Sized):
        if not len(items):
            return
        workers = min(workers, len(items))
    with Workers(factory, workers=workers, depth=depth, name=name) as pool:
        if on_close is not None:
            pool.on_close(on_close)
        for item in items:
            pool.submit(item)


def map_all(fn: Callable[[T], R], items: Iterable[T], *, workers: int, name: str,
            on_close: Callable[[], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]``, computed by *workers* threads; raises the first error."""
    todo = list(items)
    results: list[Any] = [None] * len(todo)

    def handle(job: tuple[int, T]) -> None:
        i, item = job
        results[i] = fn(item)

    run_all(list(enumerate(todo)), lambda: handle, workers=workers, name=name, on_close=on_close)
    return results
