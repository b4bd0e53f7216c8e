"""Telling systemd the truth through sd_notify; nothing is sent without NOTIFY_SOCKET.

- `ready()` once the database is open and every port accepts connections;
- `status()` lines for `systemctl status` (address, topics, messages stored);
- WATCHDOG=1 after each liveness check that passes (smq.server.liveness runs one at least
  every half WATCHDOG_USEC), so that systemd restarts a wedged server;
- `stopping()` when shutdown starts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping

import sdnotify


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

    def extend_startup(self, seconds: float, status: str) -> None:
        """Ask for `seconds` more to start (a long step, such as a migration, would
        otherwise outlast TimeoutStartSec and be killed, then begin again at each restart)."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}\nSTATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def check_interval(self, wanted: float) -> float:
        """How often the liveness check runs: `wanted`, but at least twice per watchdog
        period, since each ping needs a check that passed."""
        return min(wanted, self.watchdog_seconds / 2) if self.watchdog_seconds else wanted


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
    """Tells systemd what each liveness check found (a LivenessMonitor listener): a
    WATCHDOG=1 ping when it passed, if a watchdog is asked for, and the status line.
    `stop()` before STOPPING=1: nothing is sent after it."""

    def __init__(self, notifier: Notifier, describe: Callable[[], str]) -> None:
        self._notifier = notifier
        self._describe = describe
        self._lock = threading.Lock()
        self._stopped = False

    def __call__(self, passed: bool) -> None:
        with self._lock:
            if self._stopped or not self._notifier.enabled:
                return
            if passed and self._notifier.watchdog_seconds:
                self._notifier.watchdog()
            self._notifier.status(self._describe() if passed else "liveness check failing")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
