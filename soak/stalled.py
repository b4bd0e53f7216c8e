"""A raw HTTP/2 gRPC client that never reads its replies: the hostile or stalled reader.

It speaks just enough HTTP/2 to keep its connection alive (it acknowledges SETTINGS and
PING, as any live client does) but never sends a WINDOW_UPDATE, so the server can send
it no more than the initial 64 KiB flow-control window: every reply beyond that waits
in the server. Trailers still arrive (HEADERS frames are not flow-controlled), so it
knows how each call ended: `status(stream_id)`.

Its HPACK decoder reads gRPC core's header blocks (indexed fields, literals and the
dynamic table); Huffman-coded strings, which gRPC core does not send, raise ValueError.

    conn = StalledConnection("127.0.0.1", port)
    sid = conn.call("BulkRetrieve", request.SerializeToString())
    ...
    conn.status(sid)   # None while the call is open; "8" for RESOURCE_EXHAUSTED, ...
    conn.close()
"""
from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
MAX_CONCURRENT_STREAMS = 0x3
RESET = "reset"  # status() of a stream the server reset (RST_STREAM)
STATIC_TABLE_SIZE = 61


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(payload: bytes) -> bytes:
    """A gRPC length-prefixed message (not compressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def _literal(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 127
    return bytes([len(data)]) + data


def request_headers(method: str, service: str = "smq.SuhaibMessageQueue") -> bytes:
    """A header block opening a gRPC call: literals without indexing."""
    fields = ((":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
              (":path", f"/{service}/{method}"), ("content-type", "application/grpc"),
              ("te", "trailers"))
    return b"".join(b"\x00" + _literal(name) + _literal(value) for name, value in fields)


def _integer(block: bytes, at: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer with a `prefix`-bit prefix at `at`: (value, next position)."""
    mask = (1 << prefix) - 1
    value = block[at] & mask
    at += 1
    if value < mask:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, at


class HeaderDecoder:
    """HPACK as gRPC core sends it: fields by index, literals, the dynamic table."""

    def __init__(self) -> None:
        self.table: list[tuple[str, str]] = []  # newest first
        self.max_size = 4096

    def decode(self, block: bytes) -> dict[str, str]:
        fields: dict[str, str] = {}
        at = 0
        while at < len(block):
            byte = block[at]
            if byte & 0x80:  # indexed field
                index, at = _integer(block, at, 7)
                name, value = self._entry(index)
            elif byte & 0x40:  # literal, added to the table
                index, at = _integer(block, at, 6)
                name, value, at = self._literal(block, at, index)
                self._add(name, value)
            elif byte & 0x20:  # table size update
                self.max_size, at = _integer(block, at, 5)
                self._evict()
                continue
            else:  # literal, not added (without indexing / never indexed)
                index, at = _integer(block, at, 4)
                name, value, at = self._literal(block, at, index)
            fields[name] = value
        return fields

    def _entry(self, index: int) -> tuple[str, str]:
        if index <= STATIC_TABLE_SIZE:
            return f":static-{index}", ""  # none of the static entries matters here
        return self.table[index - STATIC_TABLE_SIZE - 1]

    def _literal(self, block: bytes, at: int, index: int) -> tuple[str, str, int]:
        if index:
            name = self._entry(index)[0]
        else:
            name, at = self._string(block, at)
        value, at = self._string(block, at)
        return name, value, at

    @staticmethod
    def _string(block: bytes, at: int) -> tuple[str, int]:
        if block[at] & 0x80:
            raise ValueError("Huffman-coded header string: not supported")
        length, at = _integer(block, at, 7)
        return block[at:at + length].decode("latin-1"), at + length

    def _add(self, name: str, value: str) -> None:
        self.table.insert(0, (name, value))
        self._evict()

    def _evict(self) -> None:
        while self.table and sum(len(n) + len(v) + 32 for n, v in self.table) > self.max_size:
            self.table.pop()


class StalledConnection:
    """One HTTP/2 connection whose calls never read a reply (see the module docstring)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(None)
        self._lock = threading.Lock()
        self._next_stream = 1
        self.max_streams: int | None = None  # the server's SETTINGS_MAX_CONCURRENT_STREAMS
        self.open = 0  # calls opened and not yet ended
        self.received: dict[int, int] = {}  # DATA bytes received, by stream
        self._ended: dict[int, str] = {}
        self._ended_changed = threading.Condition(self._lock)
        self._decoder = HeaderDecoder()
        self._block = b""  # a header block being received (HEADERS + CONTINUATION)
        self._block_ends = False
        self.closed = False
        self._send(PREFACE + frame(SETTINGS, 0, 0))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def call(self, method: str, request: bytes | None,
             service: str = "smq.SuhaibMessageQueue") -> int | None:
        """Open a call with one request (None: headers only, the request never comes);
        its stream id, or None if the server's limit of concurrent streams on a
        connection is reached."""
        with self._lock:
            if self.max_streams is not None and self.open >= self.max_streams:
                return None
            stream, self._next_stream = self._next_stream, self._next_stream + 2
            self.open += 1
            data = b"" if request is None else frame(DATA, END_STREAM, stream, grpc_message(request))
            self._send(frame(HEADERS, END_HEADERS, stream, request_headers(method, service)) + data)
        return stream

    def status(self, stream: int) -> str | None:
        """How a call ended: its grpc-status ("0", "8", ...), RESET, or None while open."""
        with self._lock:
            return self._ended.get(stream)

    def statuses(self) -> dict[int, str]:
        with self._lock:
            return dict(self._ended)

    def wait_ended(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` calls ended."""
        with self._lock:
            return self._ended_changed.wait_for(lambda: len(self._ended) >= count or self.closed,
                                                timeout)

    def close(self) -> None:
        """Close the connection. shutdown() first: a close() alone leaves the TCP
        connection open while the reader thread still waits in recv()."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def _read(self) -> None:
        buffer = b""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                with self._lock:
                    self._on_frame(kind, flags, stream, payload)
        with self._lock:
            self.closed = True
            self._ended_changed.notify_all()

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[at:at + 6])
                if key == MAX_CONCURRENT_STREAMS:
                    self.max_streams = value
            self._send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._send(frame(PING, ACK, 0, payload))
        elif kind == DATA:
            self.received[stream] = self.received.get(stream, 0) + len(payload)
            if flags & END_STREAM:
                self._end(stream, "0")
        elif kind in (HEADERS, CONTINUATION):
            self._on_headers(kind, flags, stream, payload)
        elif kind == RST_STREAM:
            self._end(stream, RESET)

    def _on_headers(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == HEADERS:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            self._block, self._block_ends = b"", bool(flags & END_STREAM)
        self._block += payload
        if flags & END_HEADERS:
            fields = self._decoder.decode(self._block)  # every block: the table depends on it
            if self._block_ends:
                self._end(stream, fields.get("grpc-status", "?"))

    def _end(self, stream: int, status: str) -> None:
        if stream not in self._ended:
            self._ended[stream] = status
            self.open -= 1
            self._ended_changed.notify_all()
