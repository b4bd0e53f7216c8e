"""How fast the forwarder publishes: a rate limit (--rate-limit) and the bound on what
is in flight (--window messages, and the engine's MAX_INFLIGHT_BYTES of payload). Used
by the engine's publisher and acknowledger, on the event loop.
"""

from __future__ import annotations

import asyncio


class RateLimit:
    """At most `per_second` acquisitions a second, allowing a burst of 0.1 s worth."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        self._next = max(self._next, now - 0.1)
        delay = self._next - now
        self._next += self._interval
        if delay > 0:
            await asyncio.sleep(delay)


class InFlight:
    """Messages and payload bytes in flight: at most `count` messages and `size` bytes
    (a message larger than `size` goes alone). One waiter: the publisher."""

    def __init__(self, count: int, size: int) -> None:
        self._count, self._size = count, size
        self._messages = self._bytes = 0
        self._released = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self._messages and (self._messages >= self._count or self._bytes + size > self._size):
            self._released.clear()
            await self._released.wait()
        self._messages += 1
        self._bytes += size

    def release(self, size: int) -> None:
        self._messages -= 1
        self._bytes -= size
        self._released.set()
