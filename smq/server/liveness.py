"""The liveness check, run in the background; gRPC health and the systemd watchdog follow it.

Every `interval` seconds a thread runs the check (QueueService.liveness_problem: the
writer completes a write transaction and the database file reads, within half the
interval) and tells each listener whether it passed. The server's health service
answers NOT_SERVING while it fails; under systemd the watchdog gets no ping then
(systemd.Supervisor). Failing and passing again are logged once each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Listener = Callable[[bool], None]


class LivenessMonitor:
    """Runs `check(timeout) -> problem or None` every `interval` seconds until `stop()`."""

    def __init__(self, check: Callable[[float], str | None], interval: float) -> None:
        self._check = check
        self.interval = interval
        self.timeout = interval / 2  # a check must answer well before the next one is due
        self._listeners: tuple[Listener, ...] = ()
        self.problem: str | None = None  # what the last check found (None: it passed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smq-liveness", daemon=True)

    def add_listener(self, listener: Listener) -> None:
        """`listener(passed)` is called after every check, in the monitor's thread."""
        self._listeners += (listener,)

    def start(self) -> LivenessMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No listener is called once this returns (a check still running past its
        timeout, on a wedged disk, is left to end by itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 1)

    def _run(self) -> None:
        passed_before = True
        while not self._stop.wait(self.interval):
            problem = self._check(self.timeout)
            if self._stop.is_set():
                return
            passed = problem is None
            self.problem = problem
            if passed != passed_before:
                self._log_change(problem)
                passed_before = passed
            for listener in self._listeners:
                listener(passed)

    def _log_change(self, problem: str | None) -> None:
        if problem is None:
            log.info("liveness check passes again: health is SERVING")
        else:
            log.error(
                "liveness check failed (%s): health is NOT_SERVING and the systemd "
                "watchdog, if any, gets no ping until it passes",
                problem,
            )
