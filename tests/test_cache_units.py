"""The in-process layer and the circuit breaker, on their own."""

from __future__ import annotations

from usage_service._circuit import CircuitBreaker
from usage_service.cache import GENERATIONS_KEPT, AnswerCache, LocalCache, key_digest
from usage_service.hotset import parse_hot


def test_digest_is_sha256_of_the_key() -> None:
    import hashlib

    assert key_digest(b"abc") == hashlib.sha256(b"abc").digest()


def test_local_cache_expires_entries() -> None:
    cache: LocalCache[str] = LocalCache(10)
    cache.put(b"a", "A", expires_at=10.0)
    assert cache.get(b"a", now=9.9) == "A"
    assert cache.get(b"a", now=10.0) is None
    assert cache.peek(b"a") == ("A", 10.0)  # kept as a stale copy until pushed out


def confirmable(cache: LocalCache[str], digest: bytes, *, expires_at: float, hard_deadline: float) -> None:
    cache.put(digest, digest.decode(), expires_at, hard_deadline=hard_deadline, generation=cache.generation)


def test_a_confirmation_keeps_entries_of_its_generation_fresh_up_to_their_hard_deadline() -> None:
    cache: LocalCache[str] = LocalCache(10)
    confirmable(cache, b"a", expires_at=1.0, hard_deadline=60.0)
    confirmable(cache, b"b", expires_at=1.0, hard_deadline=8.0)
    cache.put(b"own", "own", expires_at=1.0)  # put without a generation: its own deadline only
    cache.confirm(10.0)
    assert [cache.get(d, now=5.0) for d in (b"a", b"b", b"own")] == ["a", "b", None]
    assert [cache.get(d, now=9.0) for d in (b"a", b"b")] == ["a", None]  # b's hard deadline holds
    assert cache.get(b"a", now=10.0) is None  # and so does the watermark
    assert cache.peek(b"a") == ("a", 10.0) and cache.peek(b"b") == ("b", 8.0)
    cache.confirm(5.0)  # an older confirmation does not take back a newer one
    assert cache.get(b"a", now=9.0) == "a"


def test_no_confirmation_revives_an_expired_entry() -> None:
    cache: LocalCache[str] = LocalCache(10)
    confirmable(cache, b"a", expires_at=10.0, hard_deadline=60.0)
    cache.confirm(20.0)
    cache.expire(b"a", now=12.0)  # an invalidation
    assert cache.get(b"a", now=12.0) is None
    cache.confirm(50.0)
    assert cache.get(b"a", now=13.0) is None
    assert cache.peek(b"a") == ("a", 12.0)  # a stale copy, expired when it was invalidated
    cache.expire(b"missing", now=12.0)  # nothing to expire: nothing happens
    assert cache.peek(b"missing") is None


def test_a_new_generation_withdraws_confirmations_from_what_is_held() -> None:
    cache: LocalCache[str] = LocalCache(10)
    confirmable(cache, b"old", expires_at=2.0, hard_deadline=60.0)
    cache.confirm(10.0)
    cache.new_generation(now=5.0)  # the channel was lost: invalidations may be missed from here
    assert cache.get(b"old", now=1.0) == "old"  # its own deadline still holds
    assert cache.get(b"old", now=5.0) is None
    assert cache.peek(b"old") == ("old", 5.0)  # fresh until the channel was lost
    confirmable(cache, b"new", expires_at=6.0, hard_deadline=60.0)
    cache.confirm(30.0)  # a confirmation heard after the channel came back
    assert cache.get(b"old", now=6.0) is None
    assert cache.get(b"new", now=20.0) == "new"
    cache.new_generation(now=21.0)
    cache.new_generation(now=22.0)
    assert cache.peek(b"old") == ("old", 5.0)  # generations ago: still when it stopped being fresh
    assert cache.peek(b"new") == ("new", 21.0)


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
    # Read again through a memory of the last round's members: the same, malformed ones included.
    memory: dict[bytes, tuple[bytes, int]] = {}
    assert parse_hot(members, memory) == parse_hot(members, memory) == {digest: 7}
    other = key_digest(b"o")
    assert parse_hot([b"3:" + other.hex().encode(), *members], memory) == {other: 3, digest: 7}


def test_a_long_forgotten_generation_counts_its_own_deadline() -> None:
    cache: LocalCache[str] = LocalCache(10)
    confirmable(cache, b"a", expires_at=2.0, hard_deadline=60.0)
    cache.confirm(10.0)
    for now in range(5, 5 + GENERATIONS_KEPT + 1):  # the channel flapped, more often than is remembered
        cache.new_generation(now=float(now))
    assert cache.peek(b"a") == ("a", 2.0)


def test_answer_cache_fresh_then_stale_within_bounds() -> None:
    answers: AnswerCache[bytes, str] = AnswerCache(max_size=2, max_bytes=1000, ttl=1.0, stale_if_error=10.0)
    answers.put(b"a", "A", 10, now=100.0)
    assert answers.fresh(b"a", 100.5) == "A"
    assert answers.fresh(b"a", 101.0) is None  # past USAGE_LOCAL_TTL
    assert answers.stale(b"a", 111.0) == "A"  # ended 10 s ago: still within stale-if-error
    assert answers.stale(b"a", 111.5) is None
    answers.put(b"b", "B", 10, now=100.0)
    answers.put(b"c", "C", 10, now=100.0)  # bounded by count: the oldest goes
    assert answers.stale(b"a", 100.0) is None and answers.fresh(b"c", 100.0) == "C"
    assert (len(answers), answers.bytes) == (2, 20)


def test_answer_cache_is_bounded_by_bytes() -> None:
    answers: AnswerCache[bytes, str] = AnswerCache(max_size=100, max_bytes=1000, ttl=1.0, stale_if_error=10.0)
    for name in (b"a", b"b", b"c"):
        answers.put(name, name.decode(), 400, now=100.0)
    assert answers.fresh(b"a", 100.0) is None  # 1,200 bytes: the oldest went
    assert (len(answers), answers.bytes) == (2, 800)
    answers.put(b"b", "B2", 100, now=100.0)  # replaced, not counted twice
    assert answers.bytes == 500 and answers.fresh(b"b", 100.0) == "B2"
    answers.put(b"huge", "H", 5000, now=100.0)  # larger than the whole budget: kept by nobody
    assert (len(answers), answers.bytes) == (0, 0)


def test_answer_cache_with_no_ttl_keeps_only_stale_copies() -> None:
    answers: AnswerCache[bytes, str] = AnswerCache(max_size=10, max_bytes=1000, ttl=0.0, stale_if_error=300.0)
    answers.put(b"a", "A", 1, now=100.0)
    assert answers.fresh(b"a", 100.0) is None
    assert answers.stale(b"a", 100.0) == "A"
