"""The backend wrappers (repository/backends/wrappers.py): the retry policy, request counting and the stack
a repository is opened with. Faults come from the Faulty layer (tests/faults.py) under the wrapper."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from faults import Fault, Faulty
from fleece.repository import Repository
from fleece.repository.backends import (BackendWrapper, Counting, LocalBackend, RateLimited, Retrying, layer,
                                        open_backend)
from fleece.repository.backends.base import RangeReader
from fleece.repository.errors import ObjectNotFound, PermanentBackendError, TransientBackendError


def transient(name: str = "x") -> TransientBackendError:
    return TransientBackendError(f"PUT {name} failed: 503 SlowDown", object=name, code="SlowDown", status=503)


@pytest.fixture
def local(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "repo", create=True)


def retrying(inner, attempts: int = 4, sleeps: list[float] | None = None, **kw) -> Retrying:
    return Retrying(inner, attempts, sleep=(sleeps if sleeps is not None else []).append,
                    rng=random.Random(1), **kw)


# -- Retrying --------------------------------------------------------------------------------------------

def test_transient_errors_are_retried_with_growing_jittered_pauses(local) -> None:
    faulty = Faulty(local, Fault("put", error=lambda: transient("index/a"), times=3))
    sleeps: list[float] = []
    b = retrying(faulty, attempts=4, sleeps=sleeps, backoff=0.25, backoff_cap=0.6)
    b.put("index/a", b"payload")
    assert local.get("index/a") == b"payload"
    assert faulty.ops("put") == ["index/a"] * 4
    assert len(sleeps) == 3
    for n, pause in enumerate(sleeps, 1):  # full jitter: anywhere in [0, min(cap, base * 2^(n-1))]
        assert 0 <= pause <= min(0.6, 0.25 * 2 ** (n - 1))
    many = [b.delay(5) for _ in range(50)]
    assert max(many) <= 0.6 and min(many) < 0.3 < max(many)  # capped, and really spread


def test_giving_up_says_after_how_many_attempts_and_keeps_the_fields(local) -> None:
    faulty = Faulty(local, Fault("get", error=lambda: transient("data/aa/p"), times=None))
    b = retrying(faulty, attempts=3)
    with pytest.raises(TransientBackendError, match="gave up after 3 attempts: check that the storage at") as e:
        b.get("data/aa/p")
    assert (e.value.code, e.value.status, e.value.object) == ("SlowDown", 503, "data/aa/p")
    assert str(local.root) in str(e.value)
    assert len(faulty.ops("get")) == 3


@pytest.mark.parametrize("error", [PermanentBackendError("denied", code="AccessDenied", status=403),
                                   ObjectNotFound("gone"), OSError("disk on fire")])
def test_only_transient_errors_are_retried(local, error: Exception) -> None:
    faulty = Faulty(local, Fault("head", error=error, times=None))
    with pytest.raises(type(error)):
        retrying(faulty).head("config")
    assert len(faulty.ops("head")) == 1


def test_a_missing_object_is_not_retried(local) -> None:
    faulty = Faulty(local)
    with pytest.raises(ObjectNotFound):
        retrying(faulty).get("nope")
    assert faulty.ops("get") == ["nope"]


def test_put_if_absent_whose_reply_was_lost_reports_created(local) -> None:
    """Attempt 1 lands but its reply is lost; attempt 2 finds the object: that is ours, not a collision."""
    faulty = Faulty(local, Fault("put_if_absent", when="after", error=lambda: transient("points/vm/p1")))
    assert retrying(faulty).put_if_absent("points/vm/p1", b"our manifest") is True
    assert faulty.ops("put_if_absent") == ["points/vm/p1"] * 2
    assert local.get("points/vm/p1") == b"our manifest"


def test_put_if_absent_retried_into_another_writers_object_reports_existed(local) -> None:
    """The first attempt fails; meanwhile another writer creates the object: the retry must say so."""
    faulty = Faulty(local, Fault("put_if_absent", error=lambda: transient("points/vm/p1"),
                                 hook=lambda: local.put("points/vm/p1", b"their manifest")))
    assert retrying(faulty).put_if_absent("points/vm/p1", b"our manifest") is False
    assert local.get("points/vm/p1") == b"their manifest"
    # Same length, other bytes: still theirs.
    faulty = Faulty(local, Fault("put_if_absent", error=lambda: transient("points/vm/p2"),
                                 hook=lambda: local.put("points/vm/p2", b"their manifest")))
    assert retrying(faulty).put_if_absent("points/vm/p2", b"ours manifest!") is False


def test_put_if_absent_without_failures_reads_nothing_back(local) -> None:
    local.put("points/vm/p1", b"theirs")
    faulty = Faulty(local)
    assert retrying(faulty).put_if_absent("points/vm/p1", b"ours") is False
    assert faulty.calls == [("put_if_absent", "points/vm/p1")]


def test_a_listing_cut_midway_is_listed_again_without_repeats(local) -> None:
    names = [f"data/aa/p{i}" for i in range(5)]
    for n in names:
        local.put(n, b"x")
    faulty = Faulty(local, Fault("list", when="midway", error=lambda: transient("data/"), times=2))
    listed = [i.name for i in retrying(faulty).list("data/")]
    assert sorted(listed) == names and len(listed) == len(set(listed))
    assert faulty.ops("list") == ["data/"] * 3


def test_a_listing_that_keeps_failing_gives_up(local) -> None:
    local.put("index/a", b"x")
    faulty = Faulty(local, Fault("list", error=lambda: transient("index/"), times=None))
    with pytest.raises(TransientBackendError, match="gave up after 2 attempts"):
        list(retrying(faulty, attempts=2).list("index/"))


class CutMidway(BackendWrapper):
    """open_range whose first *times* bodies break after *after* bytes (a connection reset mid-GET)."""

    def __init__(self, inner, after: int, times: int) -> None:
        super().__init__(inner)
        self.after, self.times, self.opened = after, times, []

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        self.opened.append((offset, length))
        reader, cut = self.inner.open_range(name, offset, length), len(self.opened) <= self.times
        left = [self.after]

        class Broken(RangeReader):
            def readinto(self, out: memoryview) -> int:
                if cut and left[0] <= 0:
                    raise transient(name)
                n = reader.readinto(out[:left[0]] if cut else out)
                left[0] -= n
                return n

            def close(self) -> None:
                reader.close()

        return Broken(b"")


def test_a_range_cut_midway_is_resumed_from_where_it_stopped(local) -> None:
    data = random.Random(3).randbytes(1 << 20)
    local.put("data/aa/p", data)
    cut = CutMidway(local, after=100_000, times=2)
    sleeps: list[float] = []
    counting = Counting(cut)
    reader = retrying(counting, sleeps=sleeps).open_range("data/aa/p", 5000, 600_000)
    out = memoryview(bytearray(600_000))
    assert reader.readinto(out) == 600_000
    reader.close()
    assert bytes(out) == data[5000:605_000]
    # two bodies broke after 100,000 bytes each: the rest was asked for, never the whole range again
    assert cut.opened == [(5000, 600_000), (105_000, 500_000), (205_000, 400_000)]
    assert len(sleeps) == 2
    snap = counting.snapshot()
    assert snap["operations"] == {"get": 3} and snap["errors"] == {"get": 2}
    assert snap["received_bytes"] == 600_000


def test_a_range_that_keeps_breaking_gives_up(local) -> None:
    local.put("data/aa/p", bytes(300_000))
    reader = retrying(CutMidway(local, after=1000, times=99), attempts=3).open_range("data/aa/p", 0, 300_000)
    with pytest.raises(TransientBackendError, match="gave up after 3 attempts"):
        reader.readinto(memoryview(bytearray(300_000)))


def test_a_wrapper_that_only_overrides_get_is_in_the_path_of_open_range(local) -> None:
    """The contract's default open_range reads through get: a fault injector (or any wrapper that knows
    only get) sees the restore's reads."""
    local.put("data/aa/p", b"0123456789")
    faulty = Faulty(local, Fault("get", error=lambda: transient("data/aa/p"), times=1))
    reader = retrying(faulty).open_range("data/aa/p", 2, 5)
    out = memoryview(bytearray(5))
    assert reader.readinto(out) == 5 and bytes(out) == b"23456"
    assert faulty.ops("get") == ["data/aa/p"] * 2


# -- Counting ---------------------------------------------------------------------------------------------

def test_counting_counts_operations_bytes_and_failures_across_threads(local) -> None:
    counting = Counting(local)

    def work(t: int) -> None:
        for i in range(20):
            counting.put(f"data/{t:02x}/p{i}", b"x" * 100)
            assert counting.get(f"data/{t:02x}/p{i}", 10, 30) == b"x" * 30

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.put_if_absent("points/vm/p", memoryview(b"abcd")) is True
    with pytest.raises(ObjectNotFound):
        counting.head("nope")
    assert len(list(counting.list("data/"))) == 80
    counting.delete("points/vm/p")
    snap = counting.snapshot()
    assert snap["operations"] == {"put": 80, "get": 80, "put_if_absent": 1, "head": 1, "list": 1, "delete": 1}
    assert snap["errors"] == {"head": 1}
    assert snap["requests"] == {"PUT": 81, "GET": 80, "HEAD": 1, "LIST": 1, "DELETE": 1}
    assert (snap["sent_bytes"], snap["received_bytes"]) == (80 * 100 + 4, 80 * 30)
    snap["operations"]["put"] = 0
    assert counting.snapshot()["operations"]["put"] == 80  # a copy


def test_under_retrying_every_attempt_is_counted(local) -> None:
    counting = Counting(Faulty(local, Fault("put", error=lambda: transient(), times=2)))
    retrying(counting).put("index/a", b"12345")
    snap = counting.snapshot()
    assert snap["operations"] == {"put": 3} and snap["errors"] == {"put": 2}
    assert snap["sent_bytes"] == 5  # failed attempts did not report what they sent


# -- the stack a repository is opened with ------------------------------------------------------------------

def test_a_repository_is_opened_inside_the_wrappers(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path / "plain"), create=True)
    assert isinstance(b, Retrying) and isinstance(b.inner, Counting) and isinstance(b.inner.inner, LocalBackend)
    assert layer(b, RateLimited) is None
    assert b.location == b.inner.inner.location and b.parallelism == b.inner.inner.parallelism

    repo = Repository.open(str(tmp_path / "repo"), create=True, bwlimit=64 << 20, attempts=3)
    assert repo.backend.attempts == 3
    limiter = layer(repo.backend, RateLimited)
    assert limiter is not None and limiter.bucket.rate == 64 << 20
    assert isinstance(limiter.inner, Counting)
    created = repo.requests()
    assert created.get("PUT") == 1 and created.get("GET") == 1  # config: looked for, then written
    # the config, and a listing of keys/: a format 1 config next to key slots is a downgrade attack
    assert Repository.open(str(tmp_path / "repo")).requests() == {"GET": 1, "LIST": 1}
    storage = layer(repo.backend, LocalBackend)
    assert not hasattr(storage, "throttle") and not hasattr(storage, "requests")


def test_local_errors_carry_the_errno_name_and_the_object(local) -> None:
    with pytest.raises(ObjectNotFound) as e:
        local.get("data/aa/missing")
    assert (e.value.code, e.value.object, e.value.status) == ("ENOENT", "data/aa/missing", None)


def test_backup_json_reports_backend_requests_for_a_local_repository(make_vm, tmp_path: Path, scratch) -> None:
    """``backend_requests`` (a --json contract, S3-only before) now comes from the counting layer, for
    every kind of repository."""
    import json

    from checks import fleece
    from vm import random_bytes

    vm = make_vm()
    vm.write("vda", 0, random_bytes(1 << 20, 5))
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(tmp_path / "repo"), "--scratch", str(scratch),
               "--json")
    assert p.returncode == 0, p.stderr
    requests = json.loads(p.stdout)["backend_requests"]
    assert requests["PUT"] >= 4  # config, a pack, the index, the manifest
    assert requests["GET"] >= 1 and requests["LIST"] >= 1
