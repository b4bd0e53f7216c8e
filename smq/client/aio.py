"""The SMQ client for asyncio, on grpc.aio: `smq.Client`'s API as coroutines.

    from smq import AsyncClient

    async with AsyncClient("localhost", 8097) as client:
        await client.create_topic("sensors")
        offset = await client.produce("sensors", b'{"t": 21.5}')
        async for payload, offset in client.subscribe("sensors"):   # resumes by itself
            ...

Every method of `smq.client.Client` is here with the same arguments, results, errors
(`smq.errors`, same messages) and retry rules: the calls come from smq.client.rpcs, the
error table from smq.client.transport. `subscribe`, `iter_messages` and
`stream_consume` are async iterators; `stream_produce` takes an iterable or an async
iterable; `producer()` returns an `AsyncProducer` that batches sends.

Cancelling a task in a call or in an `async for` cancels the gRPC call, and so does
leaving the loop (`break`, `aclose()`): the server's stream place is freed at once.
One AsyncClient serves any number of concurrent calls over its one channel; use it from
one event loop (the channel is opened there, at the first call). `await close()` (or
leaving `async with`) ends running iterators; a closed client refuses reuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from .._proto import smq_pb2
from ..domain import DEFAULT_HOST, DEFAULT_PORT
from ..errors import NotFound
from . import rpcs
from .aio_admin import AsyncAdmin
from .producer import DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_BYTES
from .transport import channel_setup, client_target
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

if TYPE_CHECKING:
    from .aio_producer import AsyncProducer

__all__ = ["AsyncClient"]


class AsyncClient(AsyncAdmin):
    """A connection to an SMQ server for asyncio (`smq.Client`'s options and methods).

    `AsyncClient(host, port, tls_config)`; keyword-only: `unix_socket`, `timeout`,
    `retries`, `server_hostname` as for `Client`, and `channel`: a ready
    `grpc.aio.Channel` to use instead. Raises SMQAuthenticationError if a TLS file
    cannot be read, ValueError for options that do not go together."""

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
        channel: grpc.aio.Channel | None = None,
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
        self._closed = False
        self._tls_config, self._server_hostname = tls_config, server_hostname  # for the probe
        self._channel = channel
        self._stub = None
        self._setup = None
        if channel is None:  # opened at the first call, in its event loop
            self._setup = channel_setup(
                self.target,
                tls_config,
                server_hostname=server_hostname,
                max_send_mb=max_send_message_size_mb,
                max_receive_mb=max_receive_message_size_mb,
            )

    async def connect(self, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """As `Client.connect`: check that the server answers. Raises SMQConnectionError."""
        await self._run(rpcs.connect(self.target), timeout)

    async def ping(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Like `connect`, and return the round trip time in seconds."""
        started = time.perf_counter()
        await self.connect(timeout)
        return time.perf_counter() - started

    async def server_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """As `Client.server_info`: version, settings, counters and totals."""
        return await self._run(rpcs.server_info(), timeout)

    # -- offsets ----------------------------------------------------------------------

    async def get_earliest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """As `Client.get_earliest_offset`. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return await self._run(rpcs.earliest_offset(topic), timeout)

    async def get_latest_offset(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """As `Client.get_latest_offset`. Raises SMQOffsetError: TopicEmpty, NotFound."""
        return await self._run(rpcs.latest_offset(topic), timeout)

    async def delete_until_offset(
        self, topic: str, offset: int, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """As `Client.delete_until_offset`: delete every message with offset <= `offset`."""
        await self._run(rpcs.delete_until_offset(topic, offset), timeout)

    # -- producing ----------------------------------------------------------------------

    async def produce(
        self, topic: str, message: Payload, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """As `Client.produce`: append one message, return its offset. Not retried."""
        return await self._run(rpcs.produce(topic, as_bytes(message)), timeout)

    async def stream_produce(
        self,
        topic: str,
        messages: Iterable[Payload] | AsyncIterable[Payload],
        *,
        timeout: float | None = None,
    ) -> int:
        """As `Client.stream_produce`; `messages` may also be an async iterable. Returns
        the offset of the last message (0 for none). If the iterable raises, the
        messages before are appended and the exception is re-raised."""
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[smq_pb2.ProduceRequest]:
            try:
                if isinstance(messages, AsyncIterable):
                    async for message in messages:
                        yield smq_pb2.ProduceRequest(topic=topic, message=as_bytes(message))
                else:
                    for message in messages:
                        yield smq_pb2.ProduceRequest(topic=topic, message=as_bytes(message))
            except Exception as exc:  # end the stream cleanly, re-raise below
                failure.append(exc)

        try:
            response = await self._call(
                "StreamProduce", requests(), timeout, rpcs.stream_produce_op(topic)
            )
        finally:
            if failure:
                raise failure[0]
        return int(response.offset)

    async def produce_many(
        self,
        topic: str,
        messages: Iterable[Payload],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[range]:
        """As `Client.produce_many`: batches in order, one `range` of offsets per batch."""
        if batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("batch_size and max_batch_bytes must be at least 1")
        ranges: list[range] = []
        appended = 0
        for batch in batches(messages, batch_size, max_batch_bytes):
            ranges.append(await self._run(rpcs.produce_batch(topic, batch, appended), timeout))
            appended += len(batch)
        return ranges

    def producer(
        self,
        *,
        linger: float = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> AsyncProducer:
        """An `AsyncProducer` on this client: `await send(topic, payload)` gives a future
        of the message's offset; sends are batched per topic (see smq.client.aio_producer)."""
        from .aio_producer import AsyncProducer

        return AsyncProducer(
            self,
            linger=linger,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
        )

    # -- consuming ----------------------------------------------------------------------

    async def consume(
        self, topic: str, offset: int, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> Message:
        """As `Client.consume`: the message at `offset`. Raises SMQConsumeError."""
        return await self._run(rpcs.consume(topic, offset), timeout)

    async def consume_earliest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """As `Client.consume_earliest`. Raises SMQConsumeError (TopicEmpty, ...)."""
        return await self._consume_at_end(topic, "earliest", timeout)

    async def consume_latest(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> Message:
        """As `Client.consume_latest`. Raises SMQConsumeError (TopicEmpty, ...)."""
        return await self._consume_at_end(topic, "latest", timeout)

    async def _consume_at_end(self, topic: str, which: str, timeout: Timeout) -> Message:
        lookups = 0
        while True:
            offset = await self._run(rpcs.end_offset(topic, which), timeout)
            try:
                return await self._run(rpcs.consume(topic, offset, wrap_all=True), timeout)
            except NotFound:  # trimmed between the two calls: look again
                lookups += 1
                if lookups > rpcs.END_LOOKUPS_AGAIN:
                    raise

    async def bulk_retrieve(
        self, topic: str, start_offset: int, limit: int, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> smq_pb2.BulkRetrieveResponse:
        """As `Client.bulk_retrieve`: up to `limit` messages from `start_offset`, as the
        response (`.messages`, `.count`, `.next_offset`)."""
        return await self._run(rpcs.bulk_retrieve(topic, start_offset, limit), timeout)

    async def stream_consume(self, topic: str, start_offset: int) -> AsyncIterator[Message]:
        """As `Client.stream_consume`, an async iterator: every message from
        `start_offset`, then each new one; heartbeats skipped. A lost connection raises
        SMQConnectionError (`iter_messages` resumes instead)."""
        op = rpcs.stream_consume_op(topic)
        stream = self._stream(
            "StreamConsume", smq_pb2.ConsumeRequest(topic=topic, offset=start_offset)
        )
        try:
            with stream as call:
                async for response in call:
                    if response.offset != SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield Message(response.message, response.offset)
        except grpc.RpcError as exc:
            if self._closed:
                return
            raise self._error(exc, op, None) from exc
        except asyncio.CancelledError:
            if self._closed_under_us():
                return  # close() cancelled the call
            raise

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
    ) -> AsyncIterator[Message]:
        """As `Client.iter_messages`, an async iterator: the stored messages in pages,
        then (`follow`) each new one; resumes after a reconnect with no gap and no
        duplicate; `consumer=` starts after its committed offset and commits each page
        once the loop asks for the next message."""
        budget = self._timeout_of(timeout)

        async def pages(cursor: int) -> AsyncGenerator[list[Message], None]:
            while True:
                response = await self._stub_or_raise().BulkRetrieve(
                    smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=cursor, limit=page_size),
                    timeout=budget,
                )
                if not response.messages:
                    break
                yield [Message(m.message, m.offset) for m in response.messages]
                cursor = response.messages[-1].offset + 1
            if not follow:
                return
            request = smq_pb2.ConsumeRequest(topic=topic, offset=cursor)
            with self._stream("StreamConsume", request) as call:
                async for response in call:
                    if response.offset == SMQ_SPECIAL_OFFSET_HEARTBEAT:
                        yield []
                    else:
                        yield [Message(response.message, response.offset)]

        limit = None if follow and reconnect else (self.retries if reconnect else 0)
        op = rpcs.iter_messages_op(topic)
        return self._resuming(
            pages, max(from_offset, 0), op, limit, follow, consumer, topic, budget
        )

    def subscribe(
        self,
        topic: str,
        from_offset: int = 0,
        *,
        page_size: int = 0,
        reconnect: bool = True,
        consumer: str | None = None,
    ) -> AsyncIterator[Message]:
        """As `Client.subscribe`, an async iterator over the paged Subscribe stream:
        resumes like `iter_messages`; `consumer=` commits each page."""

        async def pages(cursor: int) -> AsyncGenerator[list[Message], None]:
            request = smq_pb2.SubscribeRequest(topic=topic, offset=cursor, max_messages=page_size)
            with self._stream("Subscribe", request) as call:
                async for response in call:
                    yield [Message(m.message, m.offset) for m in response.messages]

        op = rpcs.subscribe_op(topic)
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
