"""Log lines for events that can recur many times a second (a client writing into a full
disk, upkeep failing every tick): at most one line per period, saying how many were
left out. Any thread; a lock keeps the count exact."""
from __future__ import annotations

import logging
import threading
import time


class Throttled:
    """`log(level, message, *args)` logs at once, then at most once every `seconds`."""

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
