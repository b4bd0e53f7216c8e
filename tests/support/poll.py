"""eventually(): the one way tests wait for something another thread or process does.

    eventually(lambda: server.log().count("READY") == 1)
    value = eventually(lambda: read_value() or None, timeout=30)
    await eventually_async(lambda: streams_accepted(client))     # the same, in a coroutine

Calls `condition` every `interval` seconds until it returns a true value (which
eventually returns) or `timeout` seconds have passed (AssertionError, with `message`
and the last value seen). An exception from `condition` propagates at once: a
condition that cannot become true should say so instead of timing out.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str | Callable[[], str] = "condition not reached") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (within {timeout:g} s; last: {value!r})")
        time.sleep(interval)


async def eventually_async(condition: Callable[[], Awaitable[T]], timeout: float = 10.0,
                           interval: float = 0.05,
                           message: str | Callable[[], str] = "condition not reached") -> T:
    """eventually() for coroutines: awaits `condition()` every `interval` seconds, letting
    the event loop run in between."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (within {timeout:g} s; last: {value!r})")
        await asyncio.sleep(interval)
