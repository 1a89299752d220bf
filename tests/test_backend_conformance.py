"""The backend contract (repository/backends/base.py), written once and run against every backend.

Modelled on restic's backend test suite: each backend must pass it unchanged.
"""

from __future__ import annotations

import mmap
import os
import threading
import traceback

import pytest

from fleece.repository.backends import Backend
from fleece.repository.errors import ObjectNotFound
from fleece.repository.spill import Spill
from faults import Interrupt, interrupt_after


def test_put_get_head_roundtrip(backend: Backend) -> None:
    data = os.urandom(100_000)
    backend.put("data/ab/abcdef", data)
    assert backend.get("data/ab/abcdef") == data
    assert backend.head("data/ab/abcdef").size == len(data)
    assert backend.exists("data/ab/abcdef")


def test_put_replaces(backend: Backend) -> None:
    backend.put("index/x", b"first")
    backend.put("index/x", b"second, longer")
    assert backend.get("index/x") == b"second, longer"
    assert backend.head("index/x").size == len(b"second, longer")


def test_put_accepts_bytearray_and_memoryview(backend: Backend) -> None:
    backend.put("a", bytearray(b"from bytearray"))
    backend.put("b", memoryview(b"xxfrom memoryviewxx")[2:-2])
    assert backend.get("a") == b"from bytearray"
    assert backend.get("b") == b"from memoryview"


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.head("empty").size == 0
    assert [i.name for i in backend.list("empty")] == ["empty"]


def test_put_if_absent(backend: Backend) -> None:
    assert backend.put_if_absent("points/vm/p1", b"one") is True
    assert backend.put_if_absent("points/vm/p1", b"two") is False
    assert backend.get("points/vm/p1") == b"one"


def test_put_if_absent_races_have_one_winner(backend: Backend) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(backend.put_if_absent("points/vm/race", f"writer {i}".encode()))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert backend.get("points/vm/race").startswith(b"writer ")


def test_missing_objects(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    with pytest.raises(ObjectNotFound):
        backend.get("nope", 10, 10)
    with pytest.raises(ObjectNotFound):
        backend.head("dir/nope")
    assert not backend.exists("nope")
    backend.delete("nope")  # deleting a missing object is fine


def test_range_reads(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("r", data)
    assert backend.get("r", 0, 10) == data[:10]
    assert backend.get("r", 1000, 500) == data[1000:1500]
    assert backend.get("r", 1000) == data[1000:]
    assert backend.get("r", len(data) - 5, 100) == data[-5:]  # short: the object ends first
    assert backend.get("r", len(data), 10) == b""
    assert backend.get("r", len(data) + 100, 10) == b""


def test_large_object(backend: Backend) -> None:
    data = os.urandom(1 << 20) * 21  # 21 MiB: above the multipart threshold the S3 fixture sets
    backend.put("data/11/big", data)
    assert backend.head("data/11/big").size == len(data)
    assert backend.get("data/11/big", 20 << 20, 1 << 20) == data[20 << 20:]
    assert backend.get("data/11/big") == data


def test_put_from_a_page_aligned_writable_buffer(backend: Backend) -> None:
    """What the writer hands over: a view of a reused, page-aligned pack buffer, with an unaligned tail."""
    n = (3 << 20) + 123
    buf = mmap.mmap(-1, 4 << 20)
    data = os.urandom(n)
    buf[:n] = data
    with memoryview(buf) as view:
        backend.put("data/22/aligned", view[:n])
        backend.put("data/22/offset", view[4096 + 1:n])  # same buffer, not aligned at its start
    assert backend.get("data/22/aligned") == data
    assert backend.get("data/22/offset") == data[4096 + 1:]


@pytest.mark.parametrize("size", [(3 << 20) + 123, 21 << 20, 1000])
def test_put_from_a_spill_file(backend: Backend, size: int) -> None:
    """What the writer hands over since packs are built in private files: a Spill, read in pieces —
    with an unaligned tail, above the S3 fixture's multipart threshold, and below O_DIRECT's minimum."""
    data = os.urandom(size)
    spill = Spill()
    spill.write(data[:777])  # several appends, as a pack's blobs and trailer are
    spill.write(data[777:])
    backend.put(f"data/33/spill-{size}", spill)
    assert backend.get(f"data/33/spill-{size}") == data
    assert backend.head(f"data/33/spill-{size}").size == size
    backend.put(f"data/33/spill-{size}", spill)  # a retry re-reads it from the start
    assert backend.get(f"data/33/spill-{size}") == data


def test_list_by_prefix(backend: Backend) -> None:
    names = ["config", "data/ab/ab01", "data/ab/ab02", "data/cd/cd01", "index/i1", "points/vm%2F1/p1",
             "points/vm2/p1", "points/vm2/p2"]
    for i, n in enumerate(names):
        backend.put(n, b"x" * i)
    assert sorted(i.name for i in backend.list()) == names
    assert sorted(i.name for i in backend.list("data/")) == names[1:4]
    assert sorted(i.name for i in backend.list("data/a")) == names[1:3]  # partial segment
    assert sorted(i.name for i in backend.list("points/vm2/")) == names[6:]
    assert list(backend.list("nothing/")) == []
    sizes = {i.name: i.size for i in backend.list("points/")}
    assert sizes == {"points/vm%2F1/p1": 5, "points/vm2/p1": 6, "points/vm2/p2": 7}


def test_delete(backend: Backend) -> None:
    backend.put("index/gone", b"x")
    backend.delete("index/gone")
    with pytest.raises(ObjectNotFound):
        backend.get("index/gone")
    assert list(backend.list("index/")) == []


@pytest.mark.parametrize("name", ["../escape", "/abs", "a//b", "a/./b", "", "x.tmp-123", "sp ace"])
def test_invalid_names_rejected(backend: Backend, name: str) -> None:
    with pytest.raises(ValueError):
        backend.put(name, b"x")


def _inside_the_storage_backend(exc: BaseException) -> bool:
    """Whether an interrupt hit inside the storage backend's own code (or what it called), not in a
    wrapper or the test."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.filename.endswith(("backends/local.py", "backends/s3.py")) for f in frames)


def test_interrupted_put_leaves_nothing(backend: Backend) -> None:
    """A write interrupted part-way (Ctrl-C, a signal) must not leave a partial object under its name, nor
    in a listing. The interrupt lands wherever the backend is — between two writes, inside a socket send —
    so each operation is interrupted earlier and later until it was caught inside the storage backend."""
    size = max(16 << 20, getattr(backend, "multipart_threshold", 0) + (1 << 20))  # S3: several parts
    data = os.urandom(size)
    for op in ("put", "put_if_absent"):
        hit = 0
        for n, delay in enumerate(0.0005 * 2 ** i for i in range(12)):
            name = f"data/ff/partial-{op}-{n}"
            finished = False
            try:
                with interrupt_after(delay):
                    getattr(backend, op)(name, data)
                    finished = True
            except Interrupt as exc:
                hit += not finished and _inside_the_storage_backend(exc)
            if backend.exists(name):  # interrupted after it landed, or not at all: whole, then
                assert backend.get(name) == data, f"{op} left a partial object after {delay} s"
            if finished or hit:
                break
        assert hit, f"{op} was never interrupted inside the backend (each try finished first)"
    for info in backend.list():
        assert info.size == size and backend.get(info.name) == data, f"partial object {info.name}"
    assert backend.put_if_absent("points/vm/partial", b"whole") is True


def test_open_range_reads_the_range_in_pieces(backend: Backend) -> None:
    """What a restore reads: one request per range, its blobs read one by one into the caller's buffer."""
    data = os.urandom((3 << 20) + 777)
    backend.put("data/44/ranged", data)
    reader = backend.open_range("data/44/ranged", 1000, 2 << 20)
    buf = memoryview(bytearray(300_000))
    got = bytearray()
    while n := reader.readinto(buf):
        got += buf[:n]
    reader.close()
    assert bytes(got) == data[1000:1000 + (2 << 20)]
    tail = backend.open_range("data/44/ranged", len(data) - 10, 1000)  # the object ends first: fewer bytes
    assert tail.readinto(buf) == 10 and bytes(buf[:10]) == data[-10:]
    assert tail.readinto(buf) == 0
    tail.close()
    with pytest.raises(ObjectNotFound):
        backend.open_range("data/44/missing", 0, 100).readinto(buf)
