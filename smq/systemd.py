"""Telling systemd the truth through sd_notify; does nothing without NOTIFY_SOCKET.

`Notifier.ready()` once the database is open and the ports accept connections,
`status()` for the line `systemctl status` shows, `stopping()` when shutdown starts.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify messages for the service manager that started us, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._socket = sdnotify.SystemdNotifier() if self.enabled else None

    def _send(self, text: str) -> None:
        if self._socket is not None:
            self._socket.notify(text)  # sdnotify swallows socket errors (debug=False)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")
