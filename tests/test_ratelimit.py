"""--bwlimit: rate parsing and the token bucket (lower bounds only: a limiter may never be faster)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from fleece.repository.backends import LocalBackend, RateLimited, Retrying
from fleece.repository.errors import TransientBackendError, UsageError
from fleece.repository.ratelimit import TokenBucket, parse_rate


@pytest.mark.parametrize("text,value", [("20M", 20 << 20), ("512K", 512 << 10), ("1.5G", 3 << 29), ("1000", 1000),
                                        ("20MiB/s", 20 << 20), ("2m", 2 << 20)])
def test_parse_rate(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1M", "0", "10X"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bwlimit|positive"):
        parse_rate(text)


def test_token_bucket_caps_the_rate_across_threads() -> None:
    rate = 4 << 20
    bucket = TokenBucket(rate)
    start = time.monotonic()

    def send() -> None:
        for _ in range(8):
            bucket.consume(256 << 10)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    sent = 3 * 8 * (256 << 10)  # 6 MiB; the first burst (1 MiB) is free
    assert elapsed >= (sent - bucket.burst) / rate * 0.95


def test_rate_limited_backend_paces_what_is_sent_not_what_is_read(tmp_path) -> None:
    """The --bwlimit layer: puts from several threads together never beat the rate; gets are not paced."""
    rate = 4 << 20
    b = RateLimited(LocalBackend(tmp_path / "repo", create=True), rate)
    start = time.monotonic()

    def send(t: int) -> None:
        for i in range(4):
            b.put(f"data/{t:02x}/p{i}", os.urandom(256 << 10))
        b.put_if_absent(f"points/vm/p{t}", os.urandom(256 << 10))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    sent = 3 * 5 * (256 << 10)  # 3.75 MiB; the first burst (1 MiB) is free
    assert elapsed >= (sent - b.bucket.burst) / rate * 0.95

    start = time.monotonic()
    for _ in range(4):
        assert len(b.get("data/00/p0")) == 256 << 10 and b.head("data/01/p1").size == 256 << 10
    assert time.monotonic() - start < 0.2  # 1 MiB read: would take 0.25 s if reads were paced


def test_every_attempt_of_a_retried_upload_is_paced(tmp_path) -> None:
    """Below Retrying, the limiter sees each attempt: a retried upload uses the link again."""
    from faults import Fault, Faulty

    rate = 1 << 20
    local = LocalBackend(tmp_path / "repo", create=True)
    failing = Faulty(local, Fault("put", name="data/aa/p", when="after", times=2,
                                  error=lambda: TransientBackendError("reply lost", object="data/aa/p")))
    b = Retrying(RateLimited(failing, rate), 3, sleep=lambda s: None)
    b.put("data/aa/warm", b"x" * b.inner.bucket.burst)  # takes the bucket's free burst...
    start = time.monotonic()
    b.put("data/aa/p", b"x" * (128 << 10))  # ...so these 3 attempts × 128 KiB wait ≥ 3 × 0.125 s
    assert time.monotonic() - start >= 3 * (128 << 10) / rate * 0.95
