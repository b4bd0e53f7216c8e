"""The SMQ side of `smq forward`: an asyncio (grpc.aio) view of one SMQ server, as
one durable named consumer. Raw stub calls: describe a topic, read and commit the
consumer's offset, and follow a topic in pages with the Subscribe stream.

Every failed call raises SourceError with one line that says what failed; `.code` is
the gRPC status.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from ._proto import smq_pb2, smq_pb2_grpc
from .client_transport import tcp_address

CALL_TIMEOUT = 10.0  # seconds for each unary call
# A Subscribe stream that brings nothing, not even a heartbeat (the server sends one
# every 10 s by default), for this long is presumed dead and opened again.
IDLE_TIMEOUT = 60.0
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024**2 + 1024**2),
    # Pings as far apart as the server allows (a dead stream is also noticed by the
    # missing heartbeats: see IDLE_TIMEOUT), and a quick return after a restart.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class SourceError(Exception):
    """An SMQ call failed. `code` is the grpc.StatusCode."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class SmqTarget:
    """Where the SMQ server is, and how to authenticate (mTLS files, PEM)."""
    host: str = "localhost"
    port: int = 8097
    unix_socket: str = ""
    client_cert: str = ""
    client_key: str = ""
    ca_cert: str = ""

    @property
    def address(self) -> str:
        if self.unix_socket:
            return f"unix:{self.unix_socket}"
        return tcp_address(self.host, self.port)

    @property
    def tls(self) -> bool:
        return bool(self.client_cert) and not self.unix_socket


@dataclasses.dataclass(frozen=True)
class TopicOffsets:
    earliest: int  # 0 while the topic stores no message
    latest: int    # 0 while the topic stores no message
    next_offset: int


class SmqSource:
    """One SMQ server, read by the durable consumer `consumer`. Create it inside the
    event loop that uses it."""

    def __init__(self, target: SmqTarget, consumer: str) -> None:
        self.target = target
        self.consumer = consumer
        if target.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(target.ca_cert), private_key=_read(target.client_key),
                certificate_chain=_read(target.client_cert))
            self._channel = grpc.aio.secure_channel(target.address, credentials, CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target.address, CHANNEL_OPTIONS)
        self._stub = smq_pb2_grpc.SuhaibMessageQueueStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def ping(self) -> None:
        await self._call("Connect", smq_pb2.ConnectRequest(), "reach the SMQ server")

    async def offsets(self, topic: str) -> TopicOffsets | None:
        """The topic's offsets; None if it does not exist."""
        try:
            reply = await self._call("DescribeTopic", smq_pb2.DescribeTopicRequest(topic=topic),
                                     f"describe topic {topic!r}")
        except SourceError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        info = reply.topic
        return TopicOffsets(info.earliest_offset, info.latest_offset, info.next_offset)

    async def committed(self, topic: str) -> int | None:
        """The consumer's committed offset on `topic`; None if it never committed."""
        try:
            reply = await self._call(
                "GetCommittedOffset",
                smq_pb2.GetCommittedOffsetRequest(consumer=self.consumer, topic=topic),
                f"read the committed offset of {self.consumer!r} on {topic!r}")
        except SourceError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND and "no committed offset" in str(exc):
                return None
            raise
        return reply.offset

    async def commit(self, topic: str, offset: int) -> None:
        await self._call("CommitOffset", smq_pb2.CommitOffsetRequest(
            consumer=self.consumer, topic=topic, offset=offset),
            f"commit offset {offset} of {topic!r} for {self.consumer!r}")

    async def pages(self, topic: str, offset: int, page_size: int
                    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Pages of (offset, payload) from `offset` (or the earliest), stored ones first,
        then each new commit; an empty page is a heartbeat. Never ends by itself."""
        call = self._stub.Subscribe(smq_pb2.SubscribeRequest(
            topic=topic, offset=offset, max_messages=page_size))
        replies = call.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        reply = await replies.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise SourceError(f"no message nor heartbeat from {self.target.address} "
                                      f"on {topic!r} for {IDLE_TIMEOUT:g} s",
                                      grpc.StatusCode.DEADLINE_EXCEEDED) from None
                yield [(m.offset, m.message) for m in reply.messages]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"follow topic {topic!r}") from None
        finally:
            call.cancel()
        raise SourceError(f"the SMQ server at {self.target.address} ended the stream of "
                          f"{topic!r}", grpc.StatusCode.UNAVAILABLE)

    async def _call(self, method: str, request: Any, action: str) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, action) from None

    def _error(self, exc: grpc.aio.AioRpcError, action: str) -> SourceError:
        details = " ".join((exc.details() or exc.code().name).split())
        return SourceError(f"could not {action} at {self.target.address}: "
                           f"{exc.code().name}: {details}", exc.code())


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()
