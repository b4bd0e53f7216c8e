"""The SMQ side of `smq forward`: an asyncio (grpc.aio) view of one SMQ server, as
one durable named consumer. Raw stub calls: describe a topic, read and commit the
consumer's offset, and follow a topic in pages with the Subscribe stream.

Every failed call raises the SMQError class of its status (and reason), with one line
that says what failed, and is counted in `SmqSource.errors` by kind (tallies.SMQ_ERRORS;
NOT_FOUND is an answer here, not counted). Runs in the forwarder's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from .._proto import smq_pb2, smq_pb2_grpc
from ..connection import ConnectionConfig, channel_options
from ..errors import (
    DeadlineExceeded,
    NoCommittedOffset,
    NotFound,
    PermissionDenied,
    SMQError,
    TopicNotFound,
    Unavailable,
    error_class,
    reason_in,
)
from .tallies import SMQ_ERRORS, Tally

CALL_TIMEOUT = 10.0  # seconds for each unary call
# A Subscribe stream that brings nothing, not even a heartbeat (the server sends one
# every 10 s by default), for this long is presumed dead and opened again.
IDLE_TIMEOUT = 60.0
MAX_RECEIVE = 64 * 1024**2 + 1024**2  # the largest page or message a server may send


@dataclasses.dataclass(frozen=True)
class TopicOffsets:
    earliest: int  # 0 while the topic stores no message
    latest: int  # 0 while the topic stores no message
    next_offset: int


class SmqSource:
    """One SMQ server, read by the durable consumer `consumer`. Create it inside the
    event loop that uses it."""

    def __init__(self, target: ConnectionConfig, consumer: str) -> None:
        self.target = target
        self.consumer = consumer
        self.errors = Tally(SMQ_ERRORS)
        options = channel_options(-1, MAX_RECEIVE)
        if target.tls:
            files = target.tls_files()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
            )
            self._channel = grpc.aio.secure_channel(target.address, credentials, options)
        else:
            self._channel = grpc.aio.insecure_channel(target.address, options)
        self._stub = smq_pb2_grpc.SuhaibMessageQueueStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def ping(self) -> None:
        await self._call("Connect", smq_pb2.ConnectRequest(), "reach the SMQ server")

    async def offsets(self, topic: str) -> TopicOffsets | None:
        """The topic's offsets; None if it does not exist."""
        try:
            reply = await self._call(
                "DescribeTopic",
                smq_pb2.DescribeTopicRequest(topic=topic),
                f"describe topic {topic!r}",
            )
        except NotFound:
            return None
        info = reply.topic
        return TopicOffsets(info.earliest_offset, info.latest_offset, info.next_offset)

    async def committed(self, topic: str) -> int | None:
        """The consumer's committed offset on `topic`; None if it never committed."""
        try:
            reply = await self._call(
                "GetCommittedOffset",
                smq_pb2.GetCommittedOffsetRequest(consumer=self.consumer, topic=topic),
                f"read the committed offset of {self.consumer!r} on {topic!r}",
            )
        except NoCommittedOffset:
            return None
        except TopicNotFound:
            raise
        except NotFound:  # a server from before reasons; the topic was described just before
            return None
        return reply.offset

    async def commit(self, topic: str, offset: int) -> None:
        await self._call(
            "CommitOffset",
            smq_pb2.CommitOffsetRequest(consumer=self.consumer, topic=topic, offset=offset),
            f"commit offset {offset} of {topic!r} for {self.consumer!r}",
        )

    async def pages(
        self, topic: str, offset: int, page_size: int
    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Pages of (offset, payload) from `offset` (or the earliest), stored ones first,
        then each new commit; an empty page is a heartbeat. Never ends by itself."""
        call = self._stub.Subscribe(
            smq_pb2.SubscribeRequest(topic=topic, offset=offset, max_messages=page_size)
        )
        replies = call.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        reply = await replies.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise self._counted(
                        DeadlineExceeded(
                            f"no message nor heartbeat from {self.target.address} "
                            f"on {topic!r} for {IDLE_TIMEOUT:g} s"
                        )
                    ) from None
                yield [(m.offset, m.message) for m in reply.messages]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"follow topic {topic!r}") from None
        finally:
            call.cancel()
        raise self._counted(
            Unavailable(f"the SMQ server at {self.target.address} ended the stream of {topic!r}")
        )

    async def _call(self, method: str, request: Any, action: str) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, action) from None

    def _error(self, exc: grpc.aio.AioRpcError, action: str) -> SMQError:
        details = " ".join((exc.details() or exc.code().name).split())
        error = error_class(exc.code().name, reason_in(exc.trailing_metadata())).from_status(
            f"could not {action} at {self.target.address}: {exc.code().name}: {details}",
            code=exc.code(),
            details=exc.details() or "",
            original_error=exc,
        )
        return self._counted(error)

    def _counted(self, error: SMQError) -> SMQError:
        """`error`, counted by its kind (a NOT_FOUND answer is not a failure)."""
        if isinstance(error, (Unavailable, DeadlineExceeded)):
            self.errors.add("unavailable")
        elif isinstance(error, PermissionDenied):
            self.errors.add("access_denied")
        elif not isinstance(error, NotFound):
            self.errors.add("other")
        return error
