"""Logging for every SMQ program: one set-up, and lines for events that recur.

`setup_logging` is called once by a program's main thread. `Throttled` and
`ThrottledByKey` may be called from any thread: a lock keeps their counts exact.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Hashable, Iterable


def setup_logging(level: str, quiet: Iterable[str] = ()) -> None:
    """Plain lines on stderr (the journal adds timestamps and the unit name). The loggers
    in `quiet` (chatty libraries) show warnings and worse only."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for name in quiet:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


class Throttled:
    """Lines for an event that can recur many times a second (a client writing into a
    full disk, upkeep failing every tick): `log(level, message, *args)` logs at once,
    then at most once every `seconds`, saying how many were left out."""

    def __init__(self, logger: logging.Logger, seconds: float = 60.0) -> None:
        self._logger = logger
        self._seconds = seconds
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._left_out = 0

    def log(self, level: int, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._seconds:
                self._left_out += 1
                return
            left_out, self._left_out, self._last = self._left_out, 0, now
        if left_out:
            message += f" (and {left_out} more like it in the last {self._seconds:g}s)"
        self._logger.log(level, message, *args)

    def quiet_since(self, now: float) -> bool:
        """Whether its last line is `seconds` old by `now` (time.monotonic())."""
        return now - self._last >= self._seconds


class ThrottledByKey:
    """A Throttled per key (a denied identity and topic: each pair's first line at
    once). At most `max_keys` are kept: when full, the keys quiet for `seconds` are
    forgotten, and while none are, new keys share one Throttled, so a caller inventing
    names cannot grow the map or flood the log."""

    def __init__(self, logger: logging.Logger, seconds: float = 60.0, max_keys: int = 1000) -> None:
        self._logger = logger
        self._seconds = seconds
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._lines: dict[Hashable, Throttled] = {}
        self._overflow = Throttled(logger, seconds)

    def log(self, key: Hashable, level: int, message: str, *args: object) -> None:
        with self._lock:
            throttled = self._lines.get(key)
            if throttled is None:
                throttled = self._new(key)
        throttled.log(level, message, *args)

    def _new(self, key: Hashable) -> Throttled:
        if len(self._lines) >= self._max_keys:
            now = time.monotonic()
            self._lines = {k: t for k, t in self._lines.items() if not t.quiet_since(now)}
        if len(self._lines) >= self._max_keys:
            return self._overflow
        throttled = self._lines[key] = Throttled(self._logger, self._seconds)
        return throttled
