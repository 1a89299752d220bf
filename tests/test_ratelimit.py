"""--bwlimit: rate parsing and the token bucket (lower bounds only: a limiter may never be faster)."""

from __future__ import annotations

import threading
import time

import pytest

from fleece.repository.errors import UsageError
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
