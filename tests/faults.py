"""Fault injection for backend tests: a wrapper layer that fails (or runs a hook at) chosen calls, and a
way to interrupt the main thread part-way through an operation.

:class:`Faulty` is a backend wrapper like the product's (``repository/backends/wrappers.py``), so it can sit
anywhere in a stack: *under* ``Retrying`` to exercise the retry policy, *over* a repository's stack to
make a backup's uploads fail, or to let another writer land between a listing and its use.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fleece.repository.backends import Backend, BackendWrapper, ObjectInfo
from fleece.repository.backends.base import Data


@dataclass
class Fault:
    """What to do to matching calls.

    :param op: the operation (``put``, ``put_if_absent``, ``get``, ``head``, ``list``, ``delete``).
    :param prefix: only names (for ``list``: prefixes) starting with this; *name* only this exact one.
    :param error: raised (an exception, or a callable making a fresh one per firing).
    :param hook: called when the fault fires (before *error* is raised).
    :param when: ``"before"`` the call reaches the inner backend (nothing happened), or ``"after"`` it
        returned (the operation took effect, the reply was lost; a listing has been taken), or, for
        ``list`` only, ``"midway"`` (after the first object was yielded).
    :param skip: let this many matching calls through first.
    :param times: fire this often (None: every matching call after *skip*).
    """

    op: str
    prefix: str = ""
    name: str | None = None
    error: BaseException | Callable[[], BaseException] | None = None
    hook: Callable[[], None] | None = None
    when: str = "before"
    skip: int = 0
    times: int | None = 1
    fired: int = 0
    _seen: int = 0

    def matches(self, op: str, name: str) -> bool:
        return op == self.op and name.startswith(self.prefix) and (self.name is None or name == self.name)


class Faulty(BackendWrapper):
    """Delegates to *inner*, applying *faults*; every call is recorded in :attr:`calls` as ``(op, name)``."""

    def __init__(self, inner: Backend, *faults: Fault) -> None:
        super().__init__(inner)
        self.faults = list(faults)
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def ops(self, op: str) -> list[str]:
        """The names (prefixes) of every call of *op*, in order."""
        return [n for o, n in self.calls if o == op]

    def _due(self, op: str, name: str) -> list[Fault]:
        with self._lock:
            self.calls.append((op, name))
            due = []
            for f in self.faults:
                if not f.matches(op, name):
                    continue
                f._seen += 1
                if f._seen > f.skip and (f.times is None or f.fired < f.times):
                    f.fired += 1
                    due.append(f)
            return due

    @staticmethod
    def _fire(faults: list[Fault], when: str) -> None:
        for f in faults:
            if f.when != when:
                continue
            if f.hook is not None:
                f.hook()
            if f.error is not None:
                raise f.error() if callable(f.error) and not isinstance(f.error, BaseException) else f.error

    def _run(self, op: str, name: str, fn: Callable[[], object]) -> object:
        due = self._due(op, name)
        self._fire(due, "before")
        out = fn()
        self._fire(due, "after")
        return out

    def put(self, name: str, data: Data) -> None:
        self._run("put", name, lambda: self.inner.put(name, data))

    def put_if_absent(self, name: str, data: Data) -> bool:
        return bool(self._run("put_if_absent", name, lambda: self.inner.put_if_absent(name, data)))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._run("get", name, lambda: self.inner.get(name, offset, length))  # type: ignore[return-value]

    def head(self, name: str) -> ObjectInfo:
        return self._run("head", name, lambda: self.inner.head(name))  # type: ignore[return-value]

    def delete(self, name: str) -> None:
        self._run("delete", name, lambda: self.inner.delete(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        due = self._due("list", prefix)
        self._fire(due, "before")
        if any(f.when == "midway" for f in due):
            return self._midway(prefix, due)
        listing = list(self.inner.list(prefix))
        self._fire(due, "after")
        return iter(listing)

    def _midway(self, prefix: str, due: list[Fault]) -> Iterator[ObjectInfo]:
        for i, info in enumerate(self.inner.list(prefix)):
            if i == 1:
                self._fire(due, "midway")
            yield info


# -- interrupting an operation part-way ----------------------------------------------------------------------

class Interrupt(BaseException):
    """Raised in the main thread by :func:`interrupt_after` (a BaseException, like KeyboardInterrupt)."""


@contextmanager
def interrupt_after(delay: float) -> Iterator[None]:
    """Raise :class:`Interrupt` in the main thread *delay* seconds into the block, if it is still running.

    A thread sends SIGUSR1 to the main thread; the handler raises wherever the main thread is — between
    two writes, inside a socket send — like Ctrl-C does. (SIGALRM is left to pytest-timeout.)
    """
    armed = [True]

    def handler(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False
            raise Interrupt(f"interrupted after {delay} s")

    done = threading.Event()
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main, "signals reach the main thread only"

    def fire() -> None:
        if not done.wait(delay):
            signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Thread(target=fire, daemon=True)
    timer.start()
    try:
        yield
    finally:
        armed[0] = False
        done.set()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
