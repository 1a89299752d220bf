"""The backend wrappers (repository/backends/wrappers.py): the retry policy, request counting and the stack
a repository is opened with. Faults come from the Faulty layer (tests/faults.py) under the wrapper."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from faults import Fault, Faulty
from fleece.repository import Repository
from fleece.repository.backends import (Counting, LocalBackend, RateLimited, Retrying, layer, open_backend)
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
