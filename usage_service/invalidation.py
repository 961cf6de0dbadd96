"""The invalidation channel: how the refresher's leader tells every worker what changed.

One pub/sub channel `<prefix>invalidate` carries every kind of message, so a worker that hears a
round's confirmation has heard that round's invalidations:
- comma-separated digests (hex): these tokens changed, drop what you hold of them;
- '@' and a wall-clock time: every hot token was checked against the database as of then;
- '#' as_of ':' the log's smallest id ':' 1 or 0 ':' comma-separated token ids: a history round
  (tails.py) checked the tokens whose history is polled as of then (all of them: 1; the hot set
  was cut at USAGE_HOT_MAX: 0), and these ones' open days changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from ._redis_guard import REDIS_FAILURES, RedisGuard, reraise_cancellation


class InvalidationChannel:
    def __init__(self, guard: RedisGuard, *, name: str) -> None:
        self.guard = guard
        self.name = name

    async def publish_invalidation(self, digests: Iterable[bytes]) -> None:
        """Tell every worker to expire these tokens in its in-process layer."""
        message = ",".join(d.hex() for d in digests)
        await self.guard.run(lambda: self.guard.client.publish(self.name, message))

    async def publish_confirmation(self, as_of: float) -> None:
        """Tell every worker that all hot records were checked against the database as of `as_of`."""
        await self.guard.run(lambda: self.guard.client.publish(self.name, f"@{as_of!r}"))

    async def publish_history(self, as_of: float, min_id: int, complete: bool, token_ids: Iterable[int]) -> None:
        """Tell every worker that a history round checked the polled tokens (`complete`: every
        one) as of `as_of`, and that these tokens' open days changed (written to Redis before)."""
        message = f"#{as_of!r}:{min_id}:{int(complete)}:{','.join(map(str, token_ids))}"
        await self.guard.run(lambda: self.guard.client.publish(self.name, message))

    async def listen(
        self,
        on_digests: Callable[[list[bytes]], None],
        on_confirm: Callable[[float], None],
        on_live: Callable[[bool], None],
        on_history: Callable[[float, int, bool, list[int]], None] | None = None,
    ) -> None:
        """Deliver invalidations and confirmations until cancelled, subscribing again after a failure.

        `on_live` hears whether messages can currently arrive.
        """
        guard = self.guard
        while not guard.closed:
            pubsub = guard.client.pubsub()
            try:
                await pubsub.subscribe(self.name)
                on_live(True)
                while True:
                    # redis-py can turn a cancellation that lands as its read times out into an
                    # ordinary empty read; without this check the listener would outlive shutdown.
                    reraise_cancellation()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    data = message["data"]
                    if isinstance(data, bytes) and data.startswith(b"@"):
                        with contextlib.suppress(ValueError):
                            on_confirm(float(data[1:]))
                    elif isinstance(data, bytes) and data.startswith(b"#"):
                        if on_history is not None:
                            with contextlib.suppress(ValueError):
                                on_history(*_parse_history(data))
                    else:
                        on_digests(_parse_digests(data))
            except REDIS_FAILURES:
                on_live(False)
                reraise_cancellation()
                await asyncio.sleep(min(1.0, guard.breaker.cooldown) or 0.1)
            finally:
                on_live(False)
                with contextlib.suppress(*REDIS_FAILURES):
                    async with asyncio.timeout(guard.timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]


def _parse_digests(data: object) -> list[bytes]:
    if not isinstance(data, bytes | str):
        return []
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    digests = []
    for part in text.split(","):
        with contextlib.suppress(ValueError):
            digest = bytes.fromhex(part)
            if len(digest) == 32:
                digests.append(digest)
    return digests


def _parse_history(data: bytes) -> tuple[float, int, bool, list[int]]:
    as_of, min_id, complete, ids = data[1:].split(b":", 3)
    return float(as_of), int(min_id), complete == b"1", [int(token_id) for token_id in ids.split(b",") if token_id]
