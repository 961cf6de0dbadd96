"""The in-process layer and the circuit breaker, on their own."""

from __future__ import annotations

from usage_service._circuit import CircuitBreaker
from usage_service.cache import LocalCache, key_digest, parse_hot


def test_digest_is_sha256_of_the_key() -> None:
    import hashlib

    assert key_digest(b"abc") == hashlib.sha256(b"abc").digest()


def test_local_cache_expires_entries() -> None:
    cache: LocalCache[str] = LocalCache(10)
    cache.put(b"a", "A", expires_at=10.0)
    assert cache.get(b"a", now=9.9) == "A"
    assert cache.get(b"a", now=10.0) is None
    assert cache.peek(b"a") == (10.0, "A")  # kept as a stale copy until pushed out


def test_local_cache_extends_only_live_entries() -> None:
    cache: LocalCache[str] = LocalCache(10)
    cache.put(b"live", "L", expires_at=10.0)
    cache.put(b"gone", "G", expires_at=5.0)
    cache.extend(20.0, now=6.0)
    assert cache.get(b"live", now=15.0) == "L"
    assert cache.get(b"gone", now=6.0) is None


def test_local_cache_is_bounded_and_evicts_oldest() -> None:
    cache: LocalCache[int] = LocalCache(3)
    for i in range(5):
        cache.put(bytes([i]), i, expires_at=100.0)
    assert len(cache) == 3
    assert cache.get(bytes([0]), 0.0) is None
    assert cache.get(bytes([1]), 0.0) is None
    assert [cache.get(bytes([i]), 0.0) for i in (2, 3, 4)] == [2, 3, 4]


def test_local_cache_rewrite_refreshes_position() -> None:
    cache: LocalCache[int] = LocalCache(2)
    cache.put(b"a", 1, 100.0)
    cache.put(b"b", 2, 100.0)
    cache.put(b"a", 3, 100.0)
    cache.put(b"c", 4, 100.0)
    assert cache.get(b"b", 0.0) is None
    assert cache.get(b"a", 0.0) == 3


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_probes_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    assert breaker.allow() and breaker.state == "closed"
    assert not breaker.failure()
    assert not breaker.failure()
    assert breaker.failure()  # third in a row opens it
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state == "half-open"
    assert breaker.allow()  # one probe...
    assert not breaker.allow()  # ...only one per cooldown
    assert not breaker.failure()  # probe failed: stays open, not "newly opened"
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    assert breaker.success()  # probe succeeded: closed again
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=1.0, clock=Clock())
    breaker.failure()
    assert not breaker.success()
    breaker.failure()
    assert breaker.state == "closed"


def test_hot_members_parse_to_digests_and_ids_skipping_malformed_ones() -> None:
    digest = key_digest(b"k")
    members = [b"7:" + digest.hex().encode(), b"x:" + digest.hex().encode(), b"8:zz", b"", b"9"]
    assert parse_hot(members) == {digest: 7}
