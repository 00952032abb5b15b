from __future__ import annotations

import asyncio
import time

import pytest

from cachepoint.errors import InvalidInput
from cachepoint.replication.ratelimit import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"), [("100Mbit", 12.5e6), ("20MB", 20e6), ("0", 0), ("1.5Gbit/s", 1.5e9 / 8), ("500k", 5e5)]
)
def test_rates_parse_in_bits_or_bytes_per_second(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10Mbps", 10e6 / 8),  # megabits, as a datasheet means it, not megabytes
        ("10MBps", 10e6),
        ("100 Mbit/s", 100e6 / 8),
        ("12MiB/s", 12 << 20),
        ("1MiB/s", 1 << 20),
        ("8Kibit", 1024),
        ("1GB/s", 1e9),
    ],
)
def test_a_lower_case_b_is_a_bit_and_an_upper_case_b_a_byte(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


def test_a_malformed_rate_is_refused_with_examples():
    with pytest.raises(InvalidInput) as err:
        parse_rate("fast")
    assert "100Mbit" in str(err.value)


def test_a_token_bucket_spreads_payments_over_time():
    # 1 MB/s with a 0.25 s burst: paying 1 MB in 10 chunks must take at least ~0.75 s. A lower bound
    # on elapsed time is what a rate limit promises; it does not depend on the machine being fast.
    async def pay_all() -> float:
        bucket = TokenBucket(1e6)
        start = time.monotonic()
        for _ in range(10):
            await bucket.pay(100_000)
        return time.monotonic() - start

    assert asyncio.run(pay_all()) >= 0.7
