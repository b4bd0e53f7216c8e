"""Logging for every SMQ program: one set-up, and lines for events that recur.

`setup_logging` is called once by a program's main thread. `Throttled` may be called
from any thread: a lock keeps its count exact.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable


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
