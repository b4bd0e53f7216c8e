"""The SMQ client: `pysmq` 1.0.8's API, plus batching, paged streams and resuming.

    from smq.client import Client

    with Client("localhost", 8097) as client:
        client.create_topic("sensors")                      # idempotent
        offset = client.produce("sensors", b'{"t": 21.5}')   # -> 1
        payload, offset = client.consume_latest("sensors")
        for payload, offset in client.iter_messages("sensors", 0):   # resumes by itself
            ...

Programs written for pysmq run unchanged once `from pysmq.client import Client` reads
`from smq.client import Client` (and the same for `ClientTLSConfig` and the exception
classes, which this module re-exports). What differs from pysmq:

- `produce` returns the real offset, `stream_produce` works.
- pysmq's positional arguments keep their places (`consume(topic, offset, timeout)`);
  what is new is keyword-only (`Client(..., *, timeout=, retries=, unix_socket=)`).
- Timeouts: every call gets `timeout=` seconds (the client's default, 10 s, unless
  given; None waits forever). Streams have no deadline.
- Idempotent calls (connect, offsets, consume, bulk_retrieve, create_topic,
  delete_until_offset, topic listing) are retried with exponential backoff while the
  server is UNAVAILABLE, within their timeout. Produce calls are never retried.
- Errors are typed by status code (see `smq.errors`): `.code` is the grpc.StatusCode,
  `.details` the server's text, and the message says what to do.
- `iter_messages` and `subscribe` follow a topic across server restarts, without gaps
  or duplicates; `produce_many` sends batches. `unix_socket=` connects locally.

A Client is thread-safe: one per process is enough. `close()` (or leaving the `with`
block) releases the connection and ends running iterators; a closed client refuses reuse.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import grpc

from ._proto import smq_pb2, smq_pb2_grpc
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded,
                     InternalError, InvalidArgument, NotFound, OffsetOutOfRange,
                     PermissionDenied, ResourceExhausted, SMQAuthenticationError,
                     SMQConnectionError, SMQConsumeError, SMQError, SMQException,
                     SMQOffsetError, SMQProduceError, SMQTimeoutError, SMQTopicCreationError,
                     TopicEmpty, TRANSPORT_ERRORS, Unauthenticated, Unavailable, Unimplemented,
                     UnknownError, with_operation)

__all__ = [
    "Client", "ClientTLSConfig", "ClientConfig", "Message", "TopicInfo", "USE_CLIENT_DEFAULT",
    "ERROR_FOR_STATUS", "SMQ_SPECIAL_OFFSET_HEARTBEAT", "DEFAULT_PORT", "DEFAULT_TIMEOUT",
    "SMQException", "SMQConnectionError", "SMQAuthenticationError", "SMQProduceError",
    "SMQConsumeError", "SMQTopicCreationError", "SMQOffsetError", "SMQTimeoutError",
]

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "localhost"
DEFAULT_PORT: Final = 8097
DEFAULT_TIMEOUT: Final = 10.0      # seconds, for every unary call
DEFAULT_RETRIES: Final = 6         # extra attempts of idempotent calls on UNAVAILABLE
DEFAULT_MAX_MESSAGE_SIZE_MB: Final = 1024  # pysmq's default, both directions
DEFAULT_PAGE_SIZE: Final = 1000    # messages per BulkRetrieve / Subscribe page
DEFAULT_BATCH_SIZE: Final = 1000   # messages per ProduceBatch request
DEFAULT_BATCH_BYTES: Final = 3 * 1024**2  # payload bytes per ProduceBatch request
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # seconds; doubled per attempt, with jitter
RECONNECT_BACKOFF_MAX = 5.0        # iterators that reconnect forever wait at most this
SMQ_SPECIAL_OFFSET_HEARTBEAT: Final = -1  # offset of StreamConsume heartbeats (pysmq's name)
_MESSAGE_OVERHEAD = 8              # protobuf framing per message in a batch, at most

#: Every gRPC status an SMQ call can end with, and the error class it raises (one-to-one).
ERROR_FOR_STATUS: Mapping[grpc.StatusCode, type[SMQError]] = MappingProxyType({
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: TopicEmpty,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OffsetOutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
})

# Iterators reconnect after these: the server went away, or a page read timed out.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_HINTS: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.PERMISSION_DENIED:
        "write through the server's Unix socket, or start it with --allow-remote-writes=true",
    grpc.StatusCode.UNAUTHENTICATED: "check the client certificate and key",
    grpc.StatusCode.INTERNAL: "the server log has the details",
}


class _UseClientDefault:
    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: The default of every `timeout=` argument: use the Client's `timeout`.
USE_CLIENT_DEFAULT: Final = _UseClientDefault()
Timeout = float | None | _UseClientDefault


@dataclasses.dataclass(frozen=True)
class ClientTLSConfig:
    """Files for mutual TLS, all PEM: the client's certificate and private key, and
    the CA that signed the server's certificate (pysmq's class, same fields)."""
    cert_file: str
    key_file: str
    ca_file: str


class ClientConfig:
    """pysmq's defaults, kept for programs that import them. Changing them has no
    effect (as in pysmq): pass `timeout=` to `Client` instead."""
    DEFAULT_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_TOPIC_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_DELETE_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_MAX_MESSAGE_SIZE_MB = DEFAULT_MAX_MESSAGE_SIZE_MB


class Message(NamedTuple):
    """A stored message. A tuple, so `payload, offset = message` works as in pysmq."""
    payload: bytes
    offset: int


@dataclasses.dataclass(frozen=True)
class TopicInfo:
    """What the server knows of a topic. Offsets are None while it stores no message."""
    name: str
    earliest_offset: int | None
    latest_offset: int | None
    message_count: int
    stored_bytes: int       # sum of payload sizes
    next_offset: int        # the offset the next message will get
    created_at: int         # unix seconds

    @classmethod
    def from_proto(cls, info: smq_pb2.TopicInfo) -> TopicInfo:
        empty = info.message_count == 0
        return cls(name=info.name,
                   earliest_offset=None if empty else info.earliest_offset,
                   latest_offset=None if empty else info.latest_offset,
                   message_count=info.message_count, stored_bytes=info.stored_bytes,
                   next_offset=info.next_offset, created_at=info.created_at)


Payload = bytes | bytearray | memoryview | str


def _as_bytes(payload: Payload) -> bytes:
    """Messages are bytes; a str is sent as UTF-8."""
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"a message must be bytes or str, not {type(payload).__name__}")


def _backoff(attempt: int, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait before retry number `attempt` (0-based): doubling, with jitter."""
    return min(cap, BACKOFF_FIRST * 2**attempt) * random.uniform(0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class _Op:
    """What a call does, for error messages and classes: `action` completes
    "could not ...", `error_class` is the pysmq class for errors of this operation."""
    action: str
    error_class: type[SMQError] | None
    topic: str | None = None
    wrap_all: bool = False  # pysmq's consume_earliest/latest wrap even connection errors


class Client:
    """A connection to an SMQ server (pysmq's `Client`, compatible).

    `Client(host, port, tls_config)` as in pysmq; keyword-only options:

    - `unix_socket`: path of the server's Unix socket (`--unix-socket`); host, port
      and TLS are then not used. Callers on the socket may always write.
    - `timeout`: seconds for each call unless the call says otherwise (default 10;
      None waits forever). Includes the retries.
    - `retries`: extra attempts of idempotent calls while the server is UNAVAILABLE.
    - `server_hostname`: the name to verify in the server's certificate, when it
      differs from `host` (e.g. connecting by IP address).
    - `channel`: a ready `grpc.Channel` to use instead (tests, custom setups).

    Raises SMQAuthenticationError if a TLS file cannot be read.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 tls_config: ClientTLSConfig | None = None,
                 max_send_message_size_mb: int = DEFAULT_MAX_MESSAGE_SIZE_MB,
                 max_receive_message_size_mb: int = DEFAULT_MAX_MESSAGE_SIZE_MB, *,
                 unix_socket: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, server_hostname: str | None = None,
                 channel: grpc.Channel | None = None) -> None:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        if tls_config is not None and unix_socket:
            raise ValueError("tls_config cannot be used with unix_socket: the server's "
                             "socket is plaintext, for callers on the same device")
        self.timeout = timeout
        self.retries = retries
        self.tls = tls_config is not None and channel is None
        if channel is not None:
            self.target = "(given channel)"
        elif unix_socket:
            self.target = f"unix:{unix_socket}"
        else:
            self.target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") \
                else f"{host}:{port}"
        if channel is None:
            channel = self._open_channel(tls_config, server_hostname, max_send_message_size_mb,
                                         max_receive_message_size_mb)
        self._channel: grpc.Channel | None = channel
        self._stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)

    def _open_channel(self, tls: ClientTLSConfig | None, server_hostname: str | None,
                      max_send_mb: int, max_receive_mb: int) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", _size_option(max_send_mb)),
            ("grpc.max_receive_message_length", _size_option(max_receive_mb)),
            # Notice a dead connection under an idle stream (the server allows pings
            # this far apart), and come back quickly after a server restart.
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if not self.tls or tls is None:
            return grpc.insecure_channel(self.target, options=options)
        files = {}
        for field, what in (("cert_file", "client certificate"), ("key_file", "client key"),
                            ("ca_file", "CA certificate")):
            path = getattr(tls, field)
            try:
                with open(path, "rb") as stream:
                    files[field] = stream.read()
            except OSError as exc:
                raise SMQAuthenticationError(
                    f"cannot read the {what} {path!r} ({field}): {exc.strerror or exc}", exc) from exc
        if server_hostname:
            options.append(("grpc.ssl_target_name_override", server_hostname))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=files["ca_file"], private_key=files["key_file"],
            certificate_chain=files["cert_file"])
        return grpc.secure_channel(self.target, credentials, options=options)

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._channel is None else ("mTLS" if self.tls else "plaintext")
        return f"<Client {self.target} ({state})>"

    def close(self) -> None:
        """Close the connection; running iterators end. Safe to call more than once."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    @property
    def closed(self) -> bool:
        return self._channel is None

    def connect(self, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Check that the server answers (the channel itself connects lazily).

        Raises SMQConnectionError (Unavailable) if it cannot be reached in time."""
        self._call("Connect", smq_pb2.ConnectRequest(), timeout,
                   _Op(f"connect to {self.target}", SMQConnectionError), idempotent=True)

    def ping(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Like `connect`, and return the round trip time in seconds."""
        started = time.perf_counter()
        self.connect(timeout)
        return time.perf_counter() - started

    # -- topics ---------------------------------------------------------------------

    def create_topic(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Create a topic; creating an existing one succeeds and changes nothing.

        Raises SMQTopicCreationError: InvalidArgument (bad name), PermissionDenied."""
        self._call("CreateTopic", smq_pb2.CreateTopicRequest(topic=topic), timeout,
                   _Op(f"create topic {topic!r}", SMQTopicCreationError, topic), idempotent=True)

    def list_topics(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[TopicInfo]:
        """Every topic, by name."""
        response = self._call("ListTopics", smq_pb2.ListTopicsRequest(), timeout,
                              _Op("list topics", None), idempotent=True)
        return [TopicInfo.from_proto(t) for t in response.topics]

    def describe_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> TopicInfo:
        """Offsets, size and counters of one topic. Raises NotFound."""
        response = self._call("DescribeTopic", smq_pb2.DescribeTopicRequest(topic=topic), timeout,
                              _Op(f"describe topic {topic!r}", None, topic), idempotent=True)
        return TopicInfo.from_proto(response.topic)

    def delete_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete a topic and all its messages. Re-creating it continues its offsets.
        Raises NotFound, PermissionDenied (remote writes disabled)."""
        self._call("DeleteTopic", smq_pb2.DeleteTopicRequest(topic=topic), timeout,
                   _Op(f"delete topic {topic!r}", None, topic))

    # -- offsets ----------------------------------------------------------------------

    def get_earliest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """The lowest offset still stored. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return self._call("GetEarliestOffset", smq_pb2.GetEarliestOffsetRequest(topic=topic),
                          timeout, _Op(f"get the earliest offset of {topic!r}", SMQOffsetError, topic),
                          idempotent=True).offset

    def get_latest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """The highest offset stored. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return self._call("GetLatestOffset", smq_pb2.GetLatestOffsetRequest(topic=topic),
                          timeout, _Op(f"get the latest offset of {topic!r}", SMQOffsetError, topic),
                          idempotent=True).offset

    def delete_until_offset(self, topic: str, offset: int,
                            timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete every message with offset <= `offset` (idempotent; offsets are never
        reused). Raises SMQOffsetError: NotFound, PermissionDenied."""
        self._call("DeleteUntilOffset", smq_pb2.DeleteUntilOffsetRequest(topic=topic, offset=offset),
                   timeout, _Op(f"delete messages of {topic!r} up to offset {offset}",
                                SMQOffsetError, topic), idempotent=True)

    # -- producing ----------------------------------------------------------------------

    def produce(self, topic: str, message: Payload, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Append one message (bytes, or str sent as UTF-8); returns its offset once it
        is committed. Not retried. Raises SMQProduceError: NotFound, InvalidArgument,
        PermissionDenied, ResourceExhausted (too large, disk full, overloaded)."""
        request = smq_pb2.ProduceRequest(topic=topic, message=_as_bytes(message))
        return self._call("Produce", request, timeout,
                          _Op(f"produce to {topic!r}", SMQProduceError, topic)).offset

    def stream_produce(self, topic: str, messages: Iterable[Payload], *,
                       timeout: float | None = None) -> int:
        """Append each message of `messages` in order over one stream; returns the offset
        of the last one (0 if there was none). No deadline unless `timeout` is given.

        If the iterable raises, the messages before are appended and the exception is
        re-raised. On a server error, the messages before the failing one stay appended."""
        failure: list[BaseException] = []

        def requests() -> Iterator[smq_pb2.ProduceRequest]:
            try:
                for message in messages:
                    yield smq_pb2.ProduceRequest(topic=topic, message=_as_bytes(message))
            except Exception as exc:  # end the stream cleanly, re-raise below
                failure.append(exc)

        try:
            offset = self._call("StreamProduce", requests(), timeout,
                                _Op(f"stream-produce to {topic!r}", SMQProduceError, topic)).offset
        finally:
            if failure:
                raise failure[0]
        return offset

    def produce_many(self, topic: str, messages: Iterable[Payload], *,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     max_batch_bytes: int = DEFAULT_BATCH_BYTES,
                     timeout: Timeout = USE_CLIENT_DEFAULT) -> list[range]:
        """Append many messages, in order, in batches of at most `batch_size` messages and
        `max_batch_bytes` bytes (a larger message goes alone). Each batch is one atomic
        ProduceBatch request: all of it is appended, or none.

        Returns the offsets, one `range` per batch, in input order:
        `[o for r in ranges for o in r]` lists every offset. `timeout` applies per batch.
        If a batch fails, the batches before it stay appended and the error message
        says how many messages were appended. Raises SMQProduceError."""
        if batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("batch_size and max_batch_bytes must be at least 1")
        ranges: list[range] = []
        appended = 0
        for batch in _batches(messages, batch_size, max_batch_bytes):
            action = f"produce a batch of {len(batch)} messages to {topic!r}"
            if appended:
                action += f" (the {appended} messages before it were appended)"
            response = self._call("ProduceBatch",
                                  smq_pb2.ProduceBatchRequest(topic=topic, messages=batch),
                                  timeout, _Op(action, SMQProduceError, topic))
            ranges.append(range(response.first_offset, response.last_offset + 1))
            appended += len(batch)
        return ranges

    # -- consuming ----------------------------------------------------------------------

    def consume(self, topic: str, offset: int, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The message at `offset`, as (payload, offset). Raises SMQConsumeError:
        OffsetOutOfRange (not produced yet), NotFound (deleted, below 1, or no topic)."""
        return self._consume(topic, offset, timeout, wrap_all=False)

    def _consume(self, topic: str, offset: int, timeout: Timeout, wrap_all: bool) -> Message:
        response = self._call("Consume", smq_pb2.ConsumeRequest(topic=topic, offset=offset), timeout,
                              _Op(f"consume offset {offset} of {topic!r}", SMQConsumeError, topic,
                                  wrap_all), idempotent=True)
        return Message(response.message, response.offset)

    def consume_earliest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The earliest stored message. Raises SMQConsumeError (TopicEmpty, ...)."""
        return self._consume_at_end(topic, "GetEarliestOffset", "earliest", timeout)

    def consume_latest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The latest message. Raises SMQConsumeError (TopicEmpty, ...)."""
        return self._consume_at_end(topic, "GetLatestOffset", "latest", timeout)

    def _consume_at_end(self, topic: str, method: str, which: str, timeout: Timeout) -> Message:
        request_class = getattr(smq_pb2, f"{method}Request")
        op = _Op(f"consume the {which} message of {topic!r}", SMQConsumeError, topic, wrap_all=True)
        attempt = 0
        while True:
            offset = self._call(method, request_class(topic=topic), timeout, op,
                                idempotent=True).offset
            try:
                return self._consume(topic, offset, timeout, wrap_all=True)
            except NotFound:  # trimmed between the two calls: look again, twice at most
                attempt += 1
                if attempt > 2:
                    raise

    def bulk_retrieve(self, topic: str, start_offset: int, limit: int,
                      timeout: Timeout = USE_CLIENT_DEFAULT) -> smq_pb2.BulkRetrieveResponse:
        """Up to `limit` messages with offset >= `start_offset` (inclusive), as the
        response message: `.messages` (each `.message`, `.offset`), `.count`,
        `.next_offset` (feed it back for the next page). `limit <= 0`: server default.
        Pages are also capped by the server. Raises SMQConsumeError."""
        request = smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=start_offset, limit=limit)
        return self._call("BulkRetrieve", request, timeout,
                          _Op(f"retrieve messages of {topic!r}", SMQConsumeError, topic),
                          idempotent=True)

    def stream_consume(self, topic: str, start_offset: int) -> Iterator[Message]:
        """Every message from `start_offset` (or the earliest), then each new one as it
        is committed; never ends by itself. Heartbeats are skipped. As in pysmq, a lost
        connection raises SMQConnectionError: `iter_messages` resumes instead."""
        op = _Op(f"stream messages of {topic!r}", SMQConsumeError, topic)
        try:
            with self._stream("StreamConsume",
                              smq_pb2.ConsumeRequest(topic=topic, offset=start_offset)) as call:
                for response in call:
                    if response.offset != SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield Message(response.message, response.offset)
        except grpc.RpcError as exc:
            if self.closed:
                return
            raise self._error(exc, op, None) from exc

    def iter_messages(self, topic: str, from_offset: int = 0, *, follow: bool = True,
                      page_size: int = DEFAULT_PAGE_SIZE, reconnect: bool = True,
                      timeout: Timeout = USE_CLIENT_DEFAULT) -> Iterator[Message]:
        """Every message from `from_offset` (0, or anything below the earliest, means the
        earliest), as (payload, offset): the stored ones in pages (BulkRetrieve), then,
        with `follow`, each new one as it is committed (StreamConsume). Without `follow`
        it ends once it has caught up.

        It knows its next offset: when the connection is lost or the server restarts,
        it reconnects (backoff up to 5 s, forever, logged as warnings; also when a page
        read times out) and goes on where it was, with no gap and no duplicate. Messages deleted meanwhile are skipped.
        `reconnect=False` raises SMQConnectionError instead; without `follow` it gives up
        after the client's `retries`. Uses only the original SMQ's calls."""
        op = _Op(f"read messages of {topic!r}", SMQConsumeError, topic)

        def pages(cursor: int) -> Iterator[list[Message]]:
            while True:
                response = self._stub_or_raise().BulkRetrieve(
                    smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=cursor, limit=page_size),
                    timeout=self._timeout_of(timeout))
                if not response.messages:
                    break
                yield [Message(m.message, m.offset) for m in response.messages]
                cursor = response.messages[-1].offset + 1
            if not follow:
                return
            with self._stream("StreamConsume",
                              smq_pb2.ConsumeRequest(topic=topic, offset=cursor)) as call:
                for response in call:
                    if response.offset == SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield []
                    else:
                        yield [Message(response.message, response.offset)]

        limit = None if follow and reconnect else (self.retries if reconnect else 0)
        return self._resuming(pages, max(from_offset, 0), op, limit, follow)

    def subscribe(self, topic: str, from_offset: int = 0, *, page_size: int = 0,
                  reconnect: bool = True) -> Iterator[Message]:
        """Like `iter_messages(topic, from_offset)`, over the paged Subscribe stream of
        this SMQ (not in the original): the fastest way to read a topic and follow it.
        Yields each message as (payload, offset); pages are up to `page_size` messages
        (0: the server's maximum). Resumes after a reconnect like `iter_messages`."""
        op = _Op(f"subscribe to {topic!r}", SMQConsumeError, topic)

        def pages(cursor: int) -> Iterator[list[Message]]:
            request = smq_pb2.SubscribeRequest(topic=topic, offset=cursor, max_messages=page_size)
            with self._stream("Subscribe", request) as call:
                for response in call:
                    yield [Message(m.message, m.offset) for m in response.messages]

        return self._resuming(pages, max(from_offset, 0), op, None if reconnect else 0, True)

    # -- plumbing -------------------------------------------------------------------------

    def _resuming(self, pages: Callable[[int], Iterator[list[Message]]], cursor: int, op: _Op,
                  max_failures: int | None, follow: bool) -> Iterator[Message]:
        """Yield messages from `pages(cursor)`, reopening it at the next offset after
        UNAVAILABLE (up to `max_failures` times in a row; None: forever)."""
        failures = 0
        while True:
            try:
                with contextlib.closing(pages(cursor)) as stream:
                    for page in stream:
                        failures = 0  # the server answered: count failures anew
                        for message in page:
                            if message.offset < cursor:
                                continue  # already yielded before a reconnect
                            cursor = message.offset + 1
                            yield message
                if not follow:
                    return
                reason = "the server ended the stream"
            except grpc.RpcError as exc:
                if self.closed:
                    return
                if exc.code() not in _RESUMABLE or (
                        max_failures is not None and failures >= max_failures):
                    raise self._error(exc, op, None) from exc
                reason = exc.details() or "unavailable"
            delay = _backoff(failures, RECONNECT_BACKOFF_MAX)
            failures += 1
            log.warning("%s: %s; reconnecting in %.1f s to go on at offset %d",
                        op.action, reason, delay, cursor)
            time.sleep(delay)
            if self.closed:
                return

    @contextlib.contextmanager
    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        """A server-streaming call, cancelled when the block ends (frees the server's slot)."""
        call = getattr(self._stub_or_raise(), method)(request)
        try:
            yield call
        finally:
            call.cancel()

    def _stub_or_raise(self) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        if self._channel is None:
            raise RuntimeError("this Client is closed; create a new one")
        return self._stub

    def _timeout_of(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _UseClientDefault) else timeout

    def _call(self, method: str, request: Any, timeout: Timeout, op: _Op,
              idempotent: bool = False) -> Any:
        """One unary (or client-streaming) call: deadline, retries, error translation."""
        call = getattr(self._stub_or_raise(), method)
        budget = self._timeout_of(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return call(request, timeout=remaining)
            except grpc.RpcError as exc:
                if idempotent and exc.code() == grpc.StatusCode.UNAVAILABLE \
                        and attempt < self.retries and not self.closed:
                    delay = _backoff(attempt)
                    if deadline is None or time.monotonic() + delay < deadline:
                        attempt += 1
                        log.debug("%s: unavailable, retry %d in %.2f s", op.action, attempt, delay)
                        time.sleep(delay)
                        continue
                raise self._error(exc, op, budget) from exc

    def _error(self, exc: grpc.RpcError, op: _Op, timeout: float | None) -> SMQError:
        """The SMQError for a failed call: the status class, combined with the
        operation's pysmq class where pysmq raises that one."""
        code = exc.code()
        details = exc.details() or ""
        status_class = ERROR_FOR_STATUS.get(code, UnknownError)
        error_class = status_class
        if op.error_class is not None and (op.wrap_all or not issubclass(status_class, TRANSPORT_ERRORS)):
            error_class = with_operation(status_class, op.error_class)
        if code == grpc.StatusCode.UNAVAILABLE:
            reason = f"the SMQ server at {self.target} is unavailable ({details}); " \
                     "check that it is running and reachable there"
            if self.tls:
                reason += ", and that the certificates match (client, server name, CA)"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            waited = f" within {timeout:g} s" if timeout is not None else ""
            reason = f"no answer from {self.target}{waited} ({details}); " \
                     "pass a larger timeout= or check the server"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            reason = f"the server at {self.target} does not support this call " \
                     f"({details}); is it an older or the original SMQ?"
        else:
            reason = details or code.name
            if code in _HINTS:
                reason += f"; {_HINTS[code]}"
        return error_class.from_status(f"could not {op.action}: {reason}", code=code,
                                       details=details, original_error=exc, topic=op.topic)


def _size_option(megabytes: int) -> int:
    """A channel size limit in bytes; -1 (unlimited) beyond what gRPC's int option holds."""
    size = megabytes * 1024 * 1024
    return -1 if megabytes < 0 or size >= 2**31 else size


def _batches(messages: Iterable[Payload], max_count: int, max_bytes: int) -> Iterator[list[bytes]]:
    """Group messages into lists of at most max_count messages and max_bytes bytes
    (counting framing); a message larger than max_bytes forms a batch alone."""
    batch: list[bytes] = []
    size = 0
    for message in messages:
        payload = _as_bytes(message)
        cost = len(payload) + _MESSAGE_OVERHEAD
        if batch and (len(batch) >= max_count or size + cost > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(payload)
        size += cost
    if batch:
        yield batch
