"""Telling systemd the truth through sd_notify; nothing is sent without NOTIFY_SOCKET.

- `ready()` once the database is open and every port accepts connections;
- `status()` lines for `systemctl status` (address, topics, messages stored);
- a watchdog thread that sends WATCHDOG=1 every half WATCHDOG_USEC, but only while
  a real liveness check passes, so that systemd restarts a wedged server;
- `stopping()` when shutdown starts.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

import sdnotify

log = logging.getLogger(__name__)

STATUS_EVERY = 10.0  # seconds between STATUS= updates when no watchdog is asked for


class Notifier:
    """sd_notify messages for the service manager that started us, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._socket = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_seconds = _watchdog_seconds(environ) if self.enabled else None

    def _send(self, text: str) -> None:
        if self._socket is not None:
            self._socket.notify(text)  # sdnotify swallows socket errors (debug=False)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC as seconds, if it is meant for this process (WATCHDOG_PID)."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Supervisor:
    """Background thread: pings the watchdog while `is_healthy(timeout)` holds and
    refreshes the status line. `stop()` ends it."""

    def __init__(self, notifier: Notifier, is_healthy: Callable[[float], bool],
                 describe: Callable[[], str]) -> None:
        self._notifier = notifier
        self._is_healthy = is_healthy
        self._describe = describe
        self._stop = threading.Event()
        watchdog = notifier.watchdog_seconds
        self._interval = watchdog / 2 if watchdog else STATUS_EVERY
        # The check must answer well before the next ping is due.
        self._check_timeout = watchdog / 4 if watchdog else STATUS_EVERY / 2
        self._thread = threading.Thread(target=self._run, name="smq-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        if self._notifier.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._check_timeout + 1)

    def _run(self) -> None:
        healthy_before = True
        while not self._stop.wait(self._interval):
            healthy = self._is_healthy(self._check_timeout)
            if self._stop.is_set():
                return
            if healthy and self._notifier.watchdog_seconds:
                self._notifier.watchdog()
            if healthy != healthy_before:
                log.log(logging.INFO if healthy else logging.ERROR, "liveness check %s",
                        "passes again" if healthy else "failed: withholding the watchdog ping")
                healthy_before = healthy
            self._notifier.status(self._describe() if healthy else "liveness check failing")
