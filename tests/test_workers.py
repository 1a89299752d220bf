"""The one executor (repository/workers.py): bounded, closable, first error wins, no thread left behind."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import pytest

from fleece.exporter.pull import BufferPool
from fleece.repository.errors import RestoreError, UsageError
from fleece.repository.workers import Closed, WorkQueue, Workers, map_all, run_all


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix + "-")]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_first_error_wins_and_wakes_a_producer_blocked_on_a_full_queue() -> None:
    first = UsageError("first")
    gate = threading.Event()
    busy: set[str] = set()

    def factory() -> Callable[[str], None]:
        def handle(item: str) -> None:
            busy.add(item)
            if item == "boom":
                gate.wait()
                raise first
            if item == "late":
                wait_until(lambda: pool.closed)
                raise RestoreError("second")  # after the first: must not replace it

        return handle

    pool: Workers[str] = Workers(factory, workers=2, depth=1, name="t-first")
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            for item in ["boom", "late", "queued", "blocked", "never"]:
                pool.submit(item)
        except BaseException as exc:  # noqa: BLE001
            raised.append(exc)

    pool.start()
    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: busy == {"boom", "late"} and len(pool.queue) == 1)  # both busy, queue full
    time.sleep(0.05)
    assert producer.is_alive()  # waiting to put "blocked"
    gate.set()
    producer.join(2)
    assert not producer.is_alive()
    assert len(raised) == 1 and raised[0] is first
    with pytest.raises(UsageError) as err:
        pool.finish()
    assert err.value is first
    assert "queued" not in busy  # the queue was dropped on the first error
    assert not threads_named("t-first")


def test_close_wakes_every_blocked_consumer_and_producer_at_once() -> None:
    empty: WorkQueue[int] = WorkQueue(2)
    full: WorkQueue[int] = WorkQueue(1)
    full.put(0)
    woken: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        try:
            empty.get()
        except Closed:
            with lock:
                woken.append("consumer")

    def produce() -> None:
        try:
            full.put(1)
        except Closed:
            with lock:
                woken.append("producer")

    threads = [threading.Thread(target=consume) for _ in range(3)] + [threading.Thread(target=produce) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert all(t.is_alive() for t in threads) and not woken
    t0 = time.monotonic()
    empty.close()
    full.close()
    for t in threads:
        t.join(1)
    assert time.monotonic() - t0 < 1.0
    assert sorted(woken) == ["consumer"] * 3 + ["producer"] * 3
    with pytest.raises(Closed):
        empty.put(1)


def test_each_worker_builds_finishes_and_closes_its_own_handler_and_no_thread_is_left() -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    ids = iter(range(100))

    class Handler:
        def __init__(self) -> None:
            with lock:
                self.id = next(ids)
            self.items: list[int] = []

        def __call__(self, item: int) -> None:
            self.items.append(item)
            if item == 13:
                raise RestoreError("thirteen")

        def finish(self) -> None:
            with lock:
                events.append(("finish", len(self.items)))

        def close(self) -> None:
            with lock:
                events.append(("close", self.id))

    run_all(list(range(12)), Handler, workers=3, name="t-ok")
    assert sorted(k for k, _ in events) == ["close"] * 3 + ["finish"] * 3
    assert sum(n for k, n in events if k == "finish") == 12
    assert not threads_named("t-ok")

    events.clear()
    with pytest.raises(RestoreError, match="thirteen"):
        run_all(range(100), Handler, workers=3, name="t-err")
    assert [k for k, _ in events] == ["close"] * 3  # no finish after a failure, but every close
    assert not threads_named("t-err")

    assert map_all(lambda x: x * x, range(50), workers=4, name="t-map") == [x * x for x in range(50)]
    assert not threads_named("t-map")


@pytest.mark.parametrize("where", ["submit", "finish"])
def test_keyboard_interrupt_closes_the_queue_and_joins_the_workers(where: str) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    never: WorkQueue[int] = WorkQueue(1)  # a resource that never comes: workers wait until cancelled

    def factory() -> Callable[[int], None]:
        def handle(item: int) -> None:
            never.get(cancel=pool)

        return handle

    pool: Workers[int] = Workers(factory, workers=2, depth=1, name="t-int")
    pool.on_close(never.wake)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with pool:
            for i in range(3 if where == "finish" else 100):  # 3 fit: the interrupt lands in finish()
                pool.submit(i)
    timer.join()
    assert time.monotonic() - t0 < 1.5
    assert pool.closed and pool.error is None
    assert not threads_named("t-int")


def test_a_pull_waiting_for_a_buffer_wakes_when_its_run_closes() -> None:
    buffers = BufferPool(1, 4096)
    run: Workers[int] = Workers(lambda: (lambda item: None), workers=1, name="t-buf")
    buffers.watch(run)
    held = buffers.get(run)
    outcome: list[str] = []

    def take() -> None:
        try:
            buffers.get(run)
            outcome.append("got one")
        except Closed:
            outcome.append("closed")

    t = threading.Thread(target=take)
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    run.close()
    t.join(0.5)
    assert outcome == ["closed"]
    buffers.put(held)  # the shared pool itself stays usable by the next pull
    assert buffers.get(WorkQueue(1)) is held
