"""The invalidation channel: how the refresher's leader tells every worker what changed.

One pub/sub channel `<prefix>invalidate:v2` carries every kind of message, so a worker that
hears a round's confirmation has heard that round's invalidations:
- comma-separated digests (hex), each followed by '=' and the fingerprint (hex) of the record
  the round read, unless it read none: these tokens changed, or the leader sees them for the
  first time; a worker keeps what it holds of one only if it has that very fingerprint, and
  drops it altogether (no stale copy) for a digest alone: the token is gone, or its key changed;
- '@' and a wall-clock time: every hot token was checked against the database as of then;
- '#' as_of ':' the log's smallest id ':' its largest id ':' 1 or 0 ':' the leadership's epoch
  ':' comma-separated token ids, each with '=' and its open days' fingerprint: a history round
  (tails.py) checked the tokens whose history is polled as of then (all of them: 1; the hot set
  was cut at USAGE_HOT_MAX: 0), and these ones' open days changed or are new to the leader. A
  leader of the version before sends no largest id, and is heard as ever; a worker of the
  version before cannot read a message that has one, and reads what it needs directly (as
  without rounds) until it is replaced;
- '!' and a wall-clock time: the leader began a history round whose word ('#') should come by
  then; '!' alone: its round ended without one (History.round_began).

The fingerprints spare the workers a reload of everything they hold whenever a leader starts
afresh (a failover, a restart) or a token becomes hot: the leader cannot know what they hold,
so it names every token it has not seen before, with what it read. (The channel's name changed
with the fingerprints: a worker of the version before, which would skip parts it cannot read
and then take the confirmation, hears nothing from a new leader and lets its entries age out.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from redis.asyncio.client import PubSub

from ._redis_guard import REDIS_FAILURES, RedisGuard, reraise_cancellation

logger = logging.getLogger("usage_service.invalidation")

# Tokens named per message: a worker reads a message in one go, so a round's first sight of
# 10,000 tokens goes out as several (in one pipeline, but on Cluster).
MESSAGE_DIGESTS = 1000

# Seconds of silence on the channel after which the listener pings Redis through it: a connection
# whose peer vanished without closing it (its host gone, a partition, a failed master powered
# off) is otherwise read from forever, hearing nothing and saying nothing.
QUIET_PING_AFTER = 2.0

# Seconds between two log lines about losing the channel (the losses between are counted in the next).
LOSS_LOG_INTERVAL = 60.0


class InvalidationChannel:
    def __init__(self, guard: RedisGuard, *, name: str) -> None:
        self.guard = guard
        self.name = name
        self.losses = 0  # times the subscription failed since start
        self._loss_logged_at = -LOSS_LOG_INTERVAL

    async def publish_invalidation(self, digests: Iterable[bytes], fingerprints: Mapping[bytes, bytes] = {}) -> None:
        """Tell every worker to expire these tokens in its in-process layer, unless what it holds
        of one has its fingerprint here."""
        parts = [_part(d.hex(), fingerprints.get(d)) for d in digests]
        messages = [",".join(parts[i : i + MESSAGE_DIGESTS]) for i in range(0, len(parts), MESSAGE_DIGESTS)]
        if len(messages) == 1:
            await self.guard.run(functools.partial(self.guard.client.publish, self.name, messages[0]))
        elif messages:
            await self.guard.run(functools.partial(self._publish_all, messages), self.guard.batch_timeout)

    async def _publish_all(self, messages: list[str]) -> None:
        if self.guard.cluster is not None:  # whose pipelines refuse PUBLISH: one after another
            for message in messages:
                await self.guard.cluster.publish(self.name, message)
            return
        pipe = self.guard.client.pipeline(transaction=False)
        for message in messages:
            pipe.publish(self.name, message)
        await pipe.execute()

    async def publish_confirmation(self, as_of: float) -> None:
        """Tell every worker that all hot records were checked against the database as of `as_of`."""
        await self.guard.run(lambda: self.guard.client.publish(self.name, f"@{as_of!r}"))

    async def publish_history(
        self,
        as_of: float,
        min_id: int,
        max_id: int,
        complete: bool,
        token_ids: Iterable[int],
        fingerprints: Mapping[int, bytes] = {},
        epoch: str = "",
    ) -> None:
        """Tell every worker that a history round of leadership `epoch` checked the polled
        tokens (`complete`: every one) as of `as_of`, when the log's ids ran from `min_id` to
        `max_id`, and that these tokens' open days changed (written to Redis before), unless
        what it holds of one has its fingerprint here."""
        changed = ",".join(_part(str(t), fingerprints.get(t)) for t in token_ids)
        message = f"#{as_of!r}:{min_id}:{max_id}:{int(complete)}:{epoch}:{changed}"
        await self.guard.run(lambda: self.guard.client.publish(self.name, message))

    async def publish_history_round(self, until: float | None) -> None:
        """Tell every worker that the leader began a history round whose word should come by
        `until`, or (None) that its round ended without one."""
        message = "!" if until is None else f"!{until!r}"
        await self.guard.run(lambda: self.guard.client.publish(self.name, message))

    async def listen(
        self,
        on_digests: Callable[[list[tuple[bytes, bytes | None]]], None],
        on_confirm: Callable[[float], None],
        on_live: Callable[[bool], None],
        on_history: Callable[[float, int, bool, list[tuple[int, bytes | None]], str, int | None], None] | None = None,
        on_history_round: Callable[[float | None], None] | None = None,
    ) -> None:
        """Deliver invalidations and confirmations until cancelled, subscribing again after a failure.

        `on_live` hears whether messages can currently arrive.
        """
        guard = self.guard
        while not guard.closed:
            pubsub = guard.client.pubsub()
            # redis-py connects again and subscribes again by itself when the connection drops
            # (a failover, a subscriber past its output buffer limit, CLIENT KILL): what was
            # published meanwhile is lost without an error. Heard as a loss.
            connects = _Connects()
            try:
                await pubsub.subscribe(self.name)
                if pubsub.connection is not None:
                    pubsub.connection.register_connect_callback(connects.made)
                # Live once Redis says the channel is subscribed, not once it was asked to: what is
                # published before that is not heard.
                await self._subscribed(pubsub)
                on_live(True)
                silence = _Silence(guard.batch_timeout)
                while True:
                    # redis-py can turn a cancellation that lands as its read times out into an
                    # ordinary empty read; without this check the listener would outlive shutdown.
                    reraise_cancellation()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if connects.count:  # before the message: it came on the new connection
                        connects.count = 0
                        on_live(False)
                        self._lost("connected again")
                        on_live(True)
                    if message is None:
                        if silence.ping_due():
                            async with asyncio.timeout(guard.timeout):
                                await pubsub.ping()
                        continue
                    silence.heard()
                    if message["type"] == "pong":
                        continue
                    data = message["data"]
                    if isinstance(data, bytes) and data.startswith(b"@"):
                        with contextlib.suppress(ValueError):
                            on_confirm(float(data[1:]))
                    elif isinstance(data, bytes) and data.startswith(b"#"):
                        if on_history is not None:
                            with contextlib.suppress(ValueError):
                                on_history(*_parse_history(data))
                    elif isinstance(data, bytes) and data.startswith(b"!"):
                        if on_history_round is not None:
                            with contextlib.suppress(ValueError):
                                on_history_round(float(data[1:]) if len(data) > 1 else None)
                    else:
                        on_digests(_parse_digests(data))
            except Exception as exc:
                # Broad on purpose, as RedisGuard.run's last resort: redis-py raises more than it
                # documents in some failover corners (a KeyError on Cluster while its seed node is
                # down). Anything else is said with its traceback (now and then, as a loss is);
                # either way the channel is subscribed again a second later.
                on_live(False)
                reraise_cancellation()
                self._lost(type(exc).__name__, unexpected=not isinstance(exc, REDIS_FAILURES))
                await asyncio.sleep(min(1.0, guard.breaker.cooldown) or 0.1)
            finally:
                on_live(False)
                if pubsub.connection is not None:  # it goes back to the pool
                    pubsub.connection.deregister_connect_callback(connects.made)
                with contextlib.suppress(*REDIS_FAILURES):
                    async with asyncio.timeout(guard.timeout):
                        # (redis-py types this from 8.2; untyped before)
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _subscribed(self, pubsub: PubSub) -> None:
        """Wait (a batch timeout at most) for Redis to confirm the subscription."""
        async with asyncio.timeout(self.guard.batch_timeout):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    return

    def _lost(self, reason: str, *, unexpected: bool = False) -> None:
        # While the channel is down, what a worker holds is confirmed by nothing: its polls go
        # to Redis or the database until a round is heard again. Said now and then, not per loss.
        self.losses += 1
        now = time.monotonic()
        if now - self._loss_logged_at >= LOSS_LOG_INTERVAL:
            logger.warning(
                "invalidation channel lost (%s), subscribing again; %d time(s) since start",
                reason,
                self.losses,
                exc_info=unexpected,
            )
            self._loss_logged_at = now


class _Silence:
    """When a quiet channel is due a ping, and when its silence means it is gone: once a ping has
    gone unanswered for `patience` seconds (anything heard from the channel answers it)."""

    def __init__(self, patience: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.patience = patience
        self.clock = clock
        self._heard_at = clock()
        self._pinged_at: float | None = None

    def heard(self) -> None:
        self._heard_at, self._pinged_at = self.clock(), None

    def ping_due(self) -> bool:
        """Whether to ping now; raise TimeoutError when the last ping went unanswered."""
        now = self.clock()
        if self._pinged_at is not None:
            if now - self._pinged_at >= self.patience:
                raise TimeoutError("the channel went silent: a ping went unanswered")
            return False
        if now - self._heard_at < QUIET_PING_AFTER:
            return False
        self._pinged_at = now
        return True


class _Connects:
    """Counts a connection's connects after the first (redis-py keeps its callbacks weakly: the
    listener holds this while it listens)."""

    def __init__(self) -> None:
        self.count = 0

    def made(self, connection: object) -> None:
        self.count += 1


def _part(name: str, fingerprint: bytes | None) -> str:
    return name if fingerprint is None else f"{name}={fingerprint.hex()}"


def _fingerprint(text: str) -> bytes | None:
    """A part's fingerprint; None when it has none or it cannot be read (then nothing held is
    kept: the safe reading)."""
    try:
        return bytes.fromhex(text) or None
    except ValueError:
        return None


def _parse_digests(data: object) -> list[tuple[bytes, bytes | None]]:
    if not isinstance(data, bytes | str):
        return []
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    changes = []
    for part in text.split(","):
        name, _, fingerprint = part.partition("=")
        with contextlib.suppress(ValueError):
            digest = bytes.fromhex(name)
            if len(digest) == 32:
                changes.append((digest, _fingerprint(fingerprint)))
    return changes


def _parse_history(data: bytes) -> tuple[float, int, bool, list[tuple[int, bytes | None]], str, int | None]:
    fields = data[1:].split(b":")
    max_id: int | None = None
    if len(fields) == 5:  # from a leader of the version before: no largest id
        as_of, min_id, complete, epoch, ids = fields
    else:
        as_of, min_id, largest, complete, epoch, ids = fields
        max_id = int(largest)
    changed = []
    for part in ids.decode("ascii").split(","):
        if part:
            token_id, _, fingerprint = part.partition("=")
            changed.append((int(token_id), _fingerprint(fingerprint)))
    return float(as_of), int(min_id), complete == b"1", changed, epoch.decode("ascii"), max_id
