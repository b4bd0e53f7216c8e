"""The metrics port: a small HTTP listener for Prometheus (the server's and smq forward's).

    GET /metrics   the registry in Prometheus' text format
    GET /healthz   200 "ok" while `health()` returns None, else 503 and its reason

One thread serves every connection, one request each (Connection: close), so scrapes
never compete with the gRPC threads for more than one core and what a client can make
it hold is bounded: at most MAX_CONNECTIONS open (a new one past it pushes out the
oldest), REQUEST_HEAD_BYTES of request each, REQUEST_SECONDS to send it and
REPLY_SECONDS to take the answer. A client that sends nothing or garbage (slow-loris)
costs one slot until its time is up, and is dropped first when another one comes.
Scrapes that arrive together share one rendering of the registry, made after they
arrived (so it shows everything done before them), and at most MAX_RENDERINGS renderings
wait for slow readers at a time (the oldest one's readers are dropped to make room): the
memory held for replies stays a few times one scrape's size. Rendering rests RENDER_REST
times as long as it took before the next one (scrapes meanwhile wait and share it), so
however many requests come, scrapes take at most 1/(1 + RENDER_REST) of a core.
"""

from __future__ import annotations

import errno
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
MAX_RENDERINGS = 4  # renderings of /metrics held for readers that have not taken them
RENDER_REST = 4.0  # after a rendering that took t seconds, the next waits until 4t later
Health = Callable[[], "str | None"]  # None: healthy; else the reason


class _Connection:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.received = b""
        self.head = b""  # the complete request head, until it is answered
        self.answered = False
        self.reply_head = b""  # the answer's status line and headers, then its body
        self.reply = b""  # (shared by the scrapes answered with one rendering)
        self.sent = 0  # bytes of reply_head + reply sent
        self.rendering = 0  # which rendering of /metrics `reply` holds (0: another answer)
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
        self._renderings = 0  # how many renderings of /metrics were made
        self._next_rendering = 0.0  # monotonic time before which none is made
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
            for key, events in self._selector.select(timeout=self._wait_seconds()):
                try:
                    self._handle(key.fileobj, events)  # type: ignore[arg-type]
                except Exception:  # a bug must not end the listener
                    log.exception("metrics listener: unexpected error")
                    conn = self._connections.get(key.fileobj)  # type: ignore[call-overload]
                    if conn is not None:
                        self._close(conn)
            self._answer_requests()
            self._drop_late(time.monotonic())

    def _wait_seconds(self) -> float:
        """Until rendering's rest ends when scrapes wait for it, else a second (how often
        the connections' time limits are looked at): an idle listener wakes once a
        second (it woke every 10 ms: 100 context switches a second on an idle board)."""
        if any(_is_scrape(c.head) for c in self._connections.values() if c.head):
            return min(max(self._next_rendering - time.monotonic(), 0.01), 1.0)
        return 1.0

    def _answer_requests(self) -> None:
        """Answer the requests completed in this round: /healthz and the others first,
        then the scrapes, which share one rendering made now (after they arrived: it
        shows everything done before them) unless rendering rests (they wait)."""
        waiting = [c for c in self._connections.values() if c.head]
        scrapes = [c for c in waiting if _is_scrape(c.head)]
        for conn in waiting:
            if conn not in scrapes:
                head, conn.head = conn.head, b""
                self._answer(conn, *self._respond(head))
        if not scrapes or time.monotonic() < self._next_rendering:
            return
        rendering = self._render()
        for conn in scrapes:
            head, conn.head = conn.head, b""
            if rendering is None:
                self._answer(conn, 500, "the scrape failed: see the log\n")
            else:
                conn.rendering = self._renderings
                self._answer(conn, 200, rendering, CONTENT_TYPE_LATEST, _method(head) == b"GET")

    def _render(self) -> bytes | None:
        """The registry in the text format (None if a collector failed: logged). Older
        renderings past MAX_RENDERINGS lose their slow readers first."""
        held = sorted({c.rendering for c in self._connections.values() if c.rendering})
        for old in held[: max(len(held) - MAX_RENDERINGS + 1, 0)]:
            for conn in [c for c in self._connections.values() if c.rendering == old]:
                self._close(conn)
        self._renderings += 1
        started = time.monotonic()
        try:
            return generate_latest(self.registry)
        except Exception:  # a bug in a collector: say so, keep serving
            log.exception("metrics: a scrape failed")
            return None
        finally:
            now = time.monotonic()
            self._next_rendering = now + RENDER_REST * (now - started)

    def _handle(self, sock: socket.socket, events: int) -> None:
        if sock is self._sock:
            self._accept()
        elif sock is self._wake_r:
            sock.recv(64)
        elif sock in self._connections:
            conn = self._connections[sock]
            if conn.answered:
                self._send(conn)
            elif not conn.head:  # (a complete head waits for the end of the round)
                self._receive(conn)

    def _accept(self) -> None:
        try:
            sock, _ = self._sock.accept()
        except OSError:  # the peer gave up already, or no fds left: try at the next event
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            # The oldest that has not sent a whole request goes (a slow-loris before a
            # scraper being answered); if every one has, the oldest.
            idle = (c for c in self._connections.values() if not (c.head or c.answered))
            self._close(next(idle, next(iter(self._connections.values()))))
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
            conn.head, conn.received = conn.received, b""  # answered at the end of the round
            conn.deadline = time.monotonic() + REPLY_SECONDS
        elif len(conn.received) > REQUEST_HEAD_BYTES:
            self._answer(conn, 431, "request head too large\n")

    def _respond(self, head: bytes) -> tuple[int, str | bytes, str, bool]:
        """(status, body, content type, whether the body is sent) for a request head
        other than a scrape."""
        method, target = _method(head), _target(head)
        if method is None or target is None:
            return 400, "bad request\n", "text/plain", True
        if method not in (b"GET", b"HEAD"):
            return 405, "only GET and HEAD\n", "text/plain", True
        with_body = method == b"GET"
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
        conn.reply_head, conn.reply, conn.sent = head, (data if with_body else b""), 0
        conn.answered, conn.received = True, b""
        conn.deadline = time.monotonic() + REPLY_SECONDS
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._send(conn)

    def _send(self, conn: _Connection) -> None:
        head = len(conn.reply_head)
        try:
            if conn.sent < head:
                conn.sent += conn.sock.send(conn.reply_head[conn.sent :])
            else:  # the body, shared: sent from a view, never copied
                conn.sent += conn.sock.send(memoryview(conn.reply)[conn.sent - head :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.sent >= head + len(conn.reply):
            self._close(conn)

    def _drop_late(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self._connections.pop(conn.sock, None) is not None:
            self._selector.unregister(conn.sock)
        conn.sock.close()


def _request_line(head: bytes) -> list[bytes]:
    words = head.split(b"\n", 1)[0].split()
    return words if len(words) == 3 and words[2].startswith(b"HTTP/") else []


def _method(head: bytes) -> bytes | None:
    words = _request_line(head)
    return words[0] if words else None


def _is_scrape(head: bytes) -> bool:
    return _method(head) in (b"GET", b"HEAD") and _target(head) == b"/metrics"


def _target(head: bytes) -> bytes | None:
    words = _request_line(head)
    return words[1].split(b"?", 1)[0] if words else None


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
            bind.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
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
        hint = " (is another server using it?)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {where} for metrics: {_reason(exc)}{hint}") from None
    return sock


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)
