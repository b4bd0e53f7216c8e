"""The metrics port: a small HTTP listener for Prometheus (the server's and smq forward's).

    GET /metrics   the registry in Prometheus' text format
    GET /healthz   200 "ok" while `health()` returns None, else 503 and its reason

One thread serves every connection, one request each (Connection: close), so scrapes
never compete with the gRPC threads for more than one core and what a client can make
it hold is bounded: at most MAX_CONNECTIONS open (a new one past it pushes out the
oldest), REQUEST_HEAD_BYTES of request each, REQUEST_SECONDS to send it and
REPLY_SECONDS to take the answer. A client that sends nothing or garbage (slow-loris)
costs one slot until its time is up, and is dropped first when another one comes.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .domain import tcp_address
from .errors import StartupError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
REQUEST_HEAD_BYTES = 8 * 1024  # a request line and headers; Prometheus sends ~300 bytes
REQUEST_SECONDS = 5.0  # from accepting a connection to having its whole request head
REPLY_SECONDS = 10.0  # to take the answer once it is ready
Health = Callable[[], "str | None"]  # None: healthy; else the reason


class _Connection:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.received = b""
        self.reply = b""  # set once the request is complete: what is left to send
        self.deadline = now + REQUEST_SECONDS


class MetricsListener:
    """Serves `registry` and `health` on bind:port (port 0: any free port) until `stop()`.
    Binding happens in the constructor: a taken port or a bad address is a StartupError."""

    def __init__(self, bind: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self.registry = registry
        self.health = health
        self._sock = _listen(bind, port)
        self.port = self._sock.getsockname()[1]
        self.address = tcp_address(bind, self.port)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._connections: dict[socket.socket, _Connection] = {}  # oldest first
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="smq-metrics", daemon=True)

    def start(self) -> MetricsListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        for conn in list(self._connections.values()):
            self._close(conn)
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, events in self._selector.select(timeout=1.0):
                try:
                    self._handle(key.fileobj, events)  # type: ignore[arg-type]
                except Exception:  # a bug must not end the listener
                    log.exception("metrics listener: unexpected error")
                    conn = self._connections.get(key.fileobj)  # type: ignore[call-overload]
                    if conn is not None:
                        self._close(conn)
            self._drop_late(time.monotonic())

    def _handle(self, sock: socket.socket, events: int) -> None:
        if sock is self._sock:
            self._accept()
        elif sock is self._wake_r:
            sock.recv(64)
        elif sock in self._connections:
            conn = self._connections[sock]
            if events & selectors.EVENT_READ and not conn.reply:
                self._receive(conn)
            elif events & selectors.EVENT_WRITE:
                self._send(conn)

    def _accept(self) -> None:
        try:
            sock, _ = self._sock.accept()
        except OSError:  # the peer gave up already, or no fds left: try at the next event
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            self._close(next(iter(self._connections.values())))  # the oldest goes
        sock.setblocking(False)
        self._connections[sock] = _Connection(sock, time.monotonic())
        self._selector.register(sock, selectors.EVENT_READ)

    def _receive(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(REQUEST_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.received += data
        if b"\r\n\r\n" in conn.received or b"\n\n" in conn.received:
            self._answer(conn, *self._respond(conn.received))
        elif len(conn.received) > REQUEST_HEAD_BYTES:
            self._answer(conn, 431, "request head too large\n")

    def _respond(self, head: bytes) -> tuple[int, str | bytes, str, bool]:
        """(status, body, content type, whether the body is sent) for a request head."""
        words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return 400, "bad request\n", "text/plain", True
        method, target = words[0], words[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "only GET and HEAD\n", "text/plain", True
        with_body = method == b"GET"
        if target == b"/metrics":
            try:
                return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST, with_body
            except Exception:  # a bug in a collector: say so, keep serving
                log.exception("metrics: a scrape failed")
                return 500, "the scrape failed: see the log\n", "text/plain", with_body
        if target == b"/healthz":
            problem = self.health()
            if problem is None:
                return 200, "ok\n", "text/plain", with_body
            return 503, f"{problem}\n", "text/plain", with_body
        if target == b"/":
            return 200, "SMQ: /metrics, /healthz\n", "text/plain", with_body
        return 404, "not found: try /metrics or /healthz\n", "text/plain", with_body

    def _answer(
        self,
        conn: _Connection,
        status: int,
        body: str | bytes,
        content_type: str = "text/plain",
        with_body: bool = True,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        conn.reply = head + data if with_body else head
        conn.received = b""
        conn.deadline = time.monotonic() + REPLY_SECONDS
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._send(conn)

    def _send(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._close(conn)

    def _drop_late(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self._connections.pop(conn.sock, None) is not None:
            self._selector.unregister(conn.sock)
        conn.sock.close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _listen(bind: str, port: int) -> socket.socket:
    """A listening socket on bind:port; StartupError (one line) if it cannot be had."""
    where = tcp_address(bind, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise StartupError(f"cannot listen on {where} for metrics: {_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        sock.bind(address)
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {where} for metrics: {_reason(exc)} (is another server using it?)"
        ) from None
    return sock


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)
