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
  delete_until_offset, listings, policies, commit_offset) are retried with exponential
  backoff while the server is UNAVAILABLE, within their timeout. Produce calls and
  deletions of topics and consumers are never retried.
- Errors are typed by status code (see `smq.errors`): `.code` is the grpc.StatusCode,
  `.details` the server's text, and the message says what to do.
- `iter_messages` and `subscribe` follow a topic across server restarts, without gaps
  or duplicates; `produce_many` sends batches. `unix_socket=` connects locally.
- This SMQ's own calls: per-topic retention (`get_topic_policy`, `set_topic_policy`),
  durable named consumers (`commit_offset`, `committed_offset`, `list_consumers`,
  `delete_consumer`, and `consumer=` on `iter_messages`/`subscribe`), `server_info`.

The value types live in `smq.client.types`, the channel and the status -> error table
in `smq.client.transport`, the call plumbing in `smq.client.calls`, the resuming
of streams in `smq.client.resume`, and the calls on topics, policies and named
consumers in `smq.client.admin`; import them all from `smq.client`.

A Client is thread-safe: one per process is enough. `close()` (or leaving the `with`
block) releases the connection and ends running iterators; a closed client refuses reuse.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator

import grpc

from .._proto import smq_pb2, smq_pb2_grpc
from ..domain import DEFAULT_HOST, DEFAULT_PORT
from ..errors import NotFound
from . import rpcs
from .admin import Admin
from .resume import Resuming
from .transport import channel_setup, client_target, open_channel
from .types import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE_MB,
    DEFAULT_PAGE_SIZE,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    SMQ_SPECIAL_OFFSET_HEARTBEAT,
    USE_CLIENT_DEFAULT,
    ClientTLSConfig,
    Message,
    Payload,
    ServerInfo,
    Timeout,
    as_bytes,
    batches,
)

__all__ = ["Client"]  # the package (smq.client) exports the rest


class Client(Resuming, Admin):
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

    Raises SMQAuthenticationError (CertificateError) if a TLS file cannot be read, is
    not PEM, or the key is not the certificate's.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        tls_config: ClientTLSConfig | None = None,
        max_send_message_size_mb: int = DEFAULT_MAX_MESSAGE_SIZE_MB,
        max_receive_message_size_mb: int = DEFAULT_MAX_MESSAGE_SIZE_MB,
        *,
        unix_socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        server_hostname: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = client_target(
            host,
            port,
            tls_config,
            unix_socket=unix_socket,
            retries=retries,
            channel_given=channel is not None,
        )
        self.timeout = timeout
        self.retries = retries
        self.tls = tls_config is not None and channel is None
        self._tls_config = tls_config
        self._server_hostname = server_hostname
        if channel is None:
            channel = open_channel(
                channel_setup(
                    self.target,
                    tls_config,
                    server_hostname=server_hostname,
                    max_send_mb=max_send_message_size_mb,
                    max_receive_mb=max_receive_message_size_mb,
                )
            )
        self._channel: grpc.Channel | None = channel
        self._stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)

    def connect(
        self, timeout: Timeout = USE_CLIENT_DEFAULT, *, unreachable_for: float | None = None
    ) -> None:
        """Check that the server answers (the channel itself connects lazily).

        Raises SMQConnectionError if it cannot be reached in time: Unavailable (nothing
        listening, ...), SMQAuthenticationError (certificates refused, TLS on one side
        only). `unreachable_for`: give up once connections have failed for this many
        seconds (a program's quick "is it there?"), while a server that takes the
        connection still has the whole `timeout` to answer."""
        rpc = rpcs.connect(self.target)
        self._call(rpc.method, rpc.request, timeout, rpc.op, rpc.idempotent, unreachable_for)

    def ping(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Like `connect`, and return the round trip time in seconds."""
        started = time.perf_counter()
        self.connect(timeout)
        return time.perf_counter() - started

    def server_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """The server's version, durability, maximum message size, uptime, commit
        counters and storage totals (not in the original SMQ: Unimplemented there)."""
        return self._run(rpcs.server_info(), timeout)

    # -- offsets ----------------------------------------------------------------------

    def get_earliest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """The lowest offset still stored. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return self._run(rpcs.earliest_offset(topic), timeout)

    def get_latest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """The highest offset stored. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return self._run(rpcs.latest_offset(topic), timeout)

    def delete_until_offset(
        self, topic: str, offset: int, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Delete every message with offset <= `offset` (idempotent; offsets are never
        reused). Raises SMQOffsetError: NotFound, PermissionDenied."""
        self._run(rpcs.delete_until_offset(topic, offset), timeout)

    # -- producing ----------------------------------------------------------------------

    def produce(self, topic: str, message: Payload, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Append one message (bytes, or str sent as UTF-8); returns its offset once it
        is committed. Not retried. Raises SMQProduceError: NotFound, InvalidArgument,
        PermissionDenied, ResourceExhausted (too large, disk full, overloaded)."""
        return self._run(rpcs.produce(topic, as_bytes(message)), timeout)

    def stream_produce(
        self, topic: str, messages: Iterable[Payload], *, timeout: float | None = None
    ) -> int:
        """Append each message of `messages` in order over one stream; returns the offset
        of the last one (0 if there was none). No deadline unless `timeout` is given.

        If the iterable raises, the messages before are appended and the exception is
        re-raised. On a server error, the messages before the failing one stay appended."""
        failure: list[BaseException] = []

        def requests() -> Iterator[smq_pb2.ProduceRequest]:
            try:
                for message in messages:
                    yield smq_pb2.ProduceRequest(topic=topic, message=as_bytes(message))
            except Exception as exc:  # end the stream cleanly, re-raise below
                failure.append(exc)

        try:
            offset = self._call(
                "StreamProduce",
                requests(),
                timeout,
                rpcs.stream_produce_op(topic),
            ).offset
        finally:
            if failure:
                raise failure[0]
        return offset

    def produce_many(
        self,
        topic: str,
        messages: Iterable[Payload],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[range]:
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
        for batch in batches(messages, batch_size, max_batch_bytes):
            ranges.append(self._run(rpcs.produce_batch(topic, batch, appended), timeout))
            appended += len(batch)
        return ranges

    def produce_batch(
        self, topic: str, messages: list[Payload], timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> range:
        """Append `messages` in one ProduceBatch request: all of them, at consecutive
        offsets (returned as a range), or none. The request must fit the server's limits
        (`produce_many` splits for you). Not retried. Raises SMQProduceError."""
        return self._run(rpcs.produce_batch(topic, [as_bytes(m) for m in messages]), timeout)

    # -- consuming ----------------------------------------------------------------------

    def consume(self, topic: str, offset: int, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The message at `offset`, as (payload, offset). Raises SMQConsumeError:
        OffsetOutOfRange (not produced yet), NotFound (deleted, below 1, or no topic)."""
        return self._run(rpcs.consume(topic, offset), timeout)

    def consume_earliest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The earliest stored message. Raises SMQConsumeError (TopicEmpty, ...)."""
        return self._consume_at_end(topic, "earliest", timeout)

    def consume_latest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """The latest message. Raises SMQConsumeError (TopicEmpty, ...)."""
        return self._consume_at_end(topic, "latest", timeout)

    def _consume_at_end(self, topic: str, which: str, timeout: Timeout) -> Message:
        lookups = 0
        while True:
            offset = self._run(rpcs.end_offset(topic, which), timeout)
            try:
                return self._run(rpcs.consume(topic, offset, wrap_all=True), timeout)
            except NotFound:  # trimmed between the two calls: look again, twice at most
                lookups += 1
                if lookups > rpcs.END_LOOKUPS_AGAIN:
                    raise

    def bulk_retrieve(
        self, topic: str, start_offset: int, limit: int, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> smq_pb2.BulkRetrieveResponse:
        """Up to `limit` messages with offset >= `start_offset` (inclusive), as the
        response message: `.messages` (each `.message`, `.offset`), `.count`,
        `.next_offset` (feed it back for the next page). `limit <= 0`: server default.
        Pages are also capped by the server. Raises SMQConsumeError."""
        return self._run(rpcs.bulk_retrieve(topic, start_offset, limit), timeout)

    def stream_consume(self, topic: str, start_offset: int) -> Iterator[Message]:
        """Every message from `start_offset` (or the earliest), then each new one as it
        is committed; never ends by itself. Heartbeats are skipped. As in pysmq, a lost
        connection raises SMQConnectionError: `iter_messages` resumes instead."""
        op = rpcs.stream_consume_op(topic)
        try:
            with self._stream(
                "StreamConsume", smq_pb2.ConsumeRequest(topic=topic, offset=start_offset)
            ) as call:
                for response in call:
                    if response.offset != SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield Message(response.message, response.offset)
        except grpc.RpcError as exc:
            if self.closed:
                return
            raise self._error(exc, op, None) from exc

    def iter_messages(
        self,
        topic: str,
        from_offset: int = 0,
        *,
        follow: bool = True,
        page_size: int = DEFAULT_PAGE_SIZE,
        reconnect: bool = True,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        consumer: str | None = None,
    ) -> Iterator[Message]:
        """Every message from `from_offset` (0, or anything below the earliest, means the
        earliest), as (payload, offset): the stored ones in pages (BulkRetrieve), then,
        with `follow`, each new one as it is committed (StreamConsume). Without `follow`
        it ends once it has caught up.

        It knows its next offset: when the connection is lost or the server restarts,
        it reconnects (backoff up to 5 s, forever, logged as warnings; also when a page
        read times out) and goes on where it was, with no gap and no duplicate. Messages
        deleted meanwhile are skipped.
        `reconnect=False` raises SMQConnectionError instead; without `follow` it gives up
        after the client's `retries`. Uses only the original SMQ's calls (but see `consumer`).

        `consumer`: a durable named consumer. It starts after the consumer's committed
        offset (at `from_offset` if it has none) and commits as it goes: the last offset
        of each page once the loop asks for the next message, so what is committed has
        been handled (at least once: after a crash, the rest of a page comes again).
        Followed messages come one per page here; `subscribe` commits fewer, larger pages.
        A loop that stops early leaves its current page uncommitted: call
        `commit_offset` with the last offset it handled."""
        op = rpcs.iter_messages_op(topic)

        def pages(cursor: int) -> Generator[list[Message], None, None]:
            while True:
                response = self._stub_or_raise().BulkRetrieve(
                    smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=cursor, limit=page_size),
                    timeout=self._timeout_of(timeout),
                )
                if not response.messages:
                    break
                yield [Message(m.message, m.offset) for m in response.messages]
                cursor = response.messages[-1].offset + 1
            if not follow:
                return
            with self._stream(
                "StreamConsume", smq_pb2.ConsumeRequest(topic=topic, offset=cursor)
            ) as call:
                for response in call:
                    if response.offset == SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield []
                    else:
                        yield [Message(response.message, response.offset)]

        limit = None if follow and reconnect else (self.retries if reconnect else 0)
        return self._resuming(
            pages,
            max(from_offset, 0),
            op,
            limit,
            follow,
            consumer,
            topic,
            self._timeout_of(timeout),
        )

    def subscribe(
        self,
        topic: str,
        from_offset: int = 0,
        *,
        page_size: int = 0,
        reconnect: bool = True,
        consumer: str | None = None,
    ) -> Iterator[Message]:
        """Like `iter_messages(topic, from_offset)`, over the paged Subscribe stream of
        this SMQ (not in the original): the fastest way to read a topic and follow it.
        Yields each message as (payload, offset); pages are up to `page_size` messages
        (0: the server's maximum). Resumes after a reconnect like `iter_messages`, and
        with `consumer=NAME` starts after its committed offset and commits each page
        (the server sends what one commit appended as one page) as `iter_messages` does."""
        op = rpcs.subscribe_op(topic)

        def pages(cursor: int) -> Generator[list[Message], None, None]:
            request = smq_pb2.SubscribeRequest(topic=topic, offset=cursor, max_messages=page_size)
            with self._stream("Subscribe", request) as call:
                for response in call:
                    yield [Message(m.message, m.offset) for m in response.messages]

        return self._resuming(
            pages,
            max(from_offset, 0),
            op,
            None if reconnect else 0,
            True,
            consumer,
            topic,
            self.timeout,
        )
