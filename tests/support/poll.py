"""eventually(): the one way tests wait for something another thread or process does.

    eventually(lambda: server.log().count("READY") == 1)
    value = eventually(lambda: read_value() or None, timeout=30)

Calls `condition` every `interval` seconds until it returns a true value (which
eventually returns) or `timeout` seconds have passed (AssertionError, with `message`
and the last value seen). An exception from `condition` propagates at once: a
condition that cannot become true should say so instead of timing out.
"""
from __future__ import annotations

import time
from collections.abc import Callable
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
