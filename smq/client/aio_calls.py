"""The plumbing under every AsyncClient call, on grpc.aio: the channel's lifecycle,
deadlines, retries of idempotent calls while the server is UNAVAILABLE, list pages,
streams that cancel when left, the resuming loop of `iter_messages` and `subscribe`,
and the translation of gRPC errors into `smq.errors` classes (the same rules as the
sync client's, from smq.client.calls, rpcs, resume and transport).

Cancellation: a task cancelled inside a call cancels that gRPC call (grpc.aio does it
for unary calls, `_stream` for streams), so no server stream place outlives its task.
grpc.aio ends a locally cancelled call with asyncio.CancelledError, also when `close()`
cancelled it: such a call is told apart from a cancelled task by `Task.cancelling()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from .._proto import smq_pb2, smq_pb2_grpc
from ..errors import SMQError
from ..retry import backoff
from .calls import (
    BACKOFF_FIRST,
    PROBE_TIMEOUT,
    budget_of,
    deadline_of,
    remaining,
    retry_delay,
)
from .probe import diagnose
from .resume import RECONNECT_BACKOFF_MAX
from .rpcs import Listing, Rpc
from .transport import RESUMABLE, ChannelSetup, Op, connect_failed, error_for, refused_stream
from .types import DEFAULT_LIST_PAGE_SIZE, ClientTLSConfig, Message, Timeout

log = logging.getLogger("smq.client")

R = TypeVar("R")
REFUSED_RETRIES = 30  # a call refused for the connection's stream limit goes again (backoff)
PageSource = Callable[[int], AsyncGenerator[list[Message], None]]


def _task_cancelled() -> bool:
    """Whether the running task has been asked to stop (not just its call cancelled)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AsyncCalls:
    """A grpc.aio channel to one server and the way calls go over it (AsyncClient's base).

    The channel is opened at the first call, in the running event loop (grpc.aio ties
    a channel to its loop); an injected channel is used as it is."""

    timeout: float | None
    retries: int
    tls: bool
    target: str
    _setup: ChannelSetup | None  # how to open the channel; None once it is open
    _channel: grpc.aio.Channel | None
    _stub: smq_pb2_grpc.SuhaibMessageQueueStub | None
    _closed: bool
    _tls_config: ClientTLSConfig | None
    _server_hostname: str | None

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("mTLS" if self.tls else "plaintext")
        return f"<AsyncClient {self.target} ({state})>"

    async def close(self) -> None:
        """Close the connection: calls still running fail (smq.Cancelled), running
        iterators end. Safe to call more than once."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- plumbing -------------------------------------------------------------------------

    def _stub_or_raise(self) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed; create a new one")
        if self._stub is None:
            if self._channel is None:
                assert self._setup is not None
                setup, self._setup = self._setup, None
                if setup.credentials is None:
                    self._channel = grpc.aio.insecure_channel(setup.target, options=setup.options)
                else:
                    self._channel = grpc.aio.secure_channel(
                        setup.target, setup.credentials, options=setup.options
                    )
            self._stub = smq_pb2_grpc.SuhaibMessageQueueStub(self._channel)
        return self._stub

    def _closed_under_us(self) -> bool:
        """A CancelledError from grpc.aio came from close(), not from a cancelled task."""
        return self._closed and not _task_cancelled()

    def _timeout_of(self, timeout: Timeout) -> float | None:
        return budget_of(timeout, self.timeout)

    async def _run(self, rpc: Rpc[R], timeout: Timeout) -> R:
        """One unary call of `smq.client.rpcs`, its answer read."""
        return rpc.read(await self._call(rpc.method, rpc.request, timeout, rpc.op, rpc.idempotent))

    async def _list(self, listing: Listing[R], timeout: Timeout) -> list[R]:
        """Every entry of a paged list call (as the sync client's `_list`)."""
        request = listing.request
        request.page_size = DEFAULT_LIST_PAGE_SIZE
        entries: list[R] = []
        while True:
            response = await self._call(
                listing.method, request, timeout, listing.op, idempotent=True
            )
            entries.extend(listing.items(response))
            if not response.next_page_token:
                return entries
            request.page_token = response.next_page_token

    async def _call(
        self, method: str, request: Any, timeout: Timeout, op: Op, idempotent: bool = False
    ) -> Any:
        """One unary (or client-streaming) call: deadline, retries, error translation.
        Cancelling the task cancels the call."""
        budget = self._timeout_of(timeout)
        deadline = deadline_of(budget)
        attempt = 0
        while True:
            call = getattr(self._stub_or_raise(), method)(request, timeout=remaining(deadline))
            try:
                return await call
            except grpc.RpcError as exc:
                # Many calls at once (gather) pass the connection's stream limit: the
                # refused ones were never processed and go again, writes too.
                refused = refused_stream(exc) and not isinstance(request, AsyncIterator)
                delay = retry_delay(
                    exc.code(),
                    idempotent or refused,
                    attempt,
                    REFUSED_RETRIES if refused else self.retries,
                    deadline,
                )
                if delay is None or self._closed:
                    raise await self._failure(exc, op, budget) from exc
            except asyncio.CancelledError:
                call.cancel()
                if self._closed_under_us():  # fail as the sync client does on close()
                    closed = grpc.aio.AioRpcError(
                        grpc.StatusCode.CANCELLED,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        details="Channel closed!",
                    )
                    raise self._error(closed, op, budget) from None
                raise
            attempt += 1
            log.debug("%s: unavailable, retry %d in %.2f s", op.action, attempt, delay)
            await asyncio.sleep(delay)

    def _error(self, exc: grpc.RpcError, op: Op, timeout: float | None) -> SMQError:
        return error_for(exc, op, target=self.target, tls=self.tls, timeout=timeout)

    async def _failure(self, exc: grpc.RpcError, op: Op, timeout: float | None) -> SMQError:
        """The error for a call that failed for good: when no connection could be made,
        after the sync client's probe of the address (in a thread: it blocks), so that
        both say why in the same words (refused, TLS expected, certificate refused, ...)."""
        diagnosis = None
        if not self._closed and connect_failed(exc) and not self.target.startswith("("):
            diagnosis = await asyncio.to_thread(
                diagnose,
                self.target,
                self._tls_config,
                server_hostname=self._server_hostname,
                timeout=PROBE_TIMEOUT,
            )
        return error_for(
            exc, op, target=self.target, tls=self.tls, timeout=timeout, diagnosis=diagnosis
        )

    @contextlib.contextmanager
    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        """A server-streaming call (iterate it with `async for`), cancelled when the block
        ends, however it ends (frees the server's stream place). A plain `with`: leaving
        it needs no await, so it also runs where a generator is closed."""
        call = getattr(self._stub_or_raise(), method)(request)
        try:
            yield call
        finally:
            call.cancel()

    # -- resuming (as smq.client.resume.Resuming) ------------------------------------

    async def _resuming(
        self,
        pages: PageSource,
        cursor: int,
        op: Op,
        max_failures: int | None,
        follow: bool,
        consumer: str | None = None,
        topic: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[Message]:
        """Yield messages from `pages(cursor)`, reopening it at the next offset after
        UNAVAILABLE (up to `max_failures` times in a row; None: forever). With a
        `consumer`: start after its committed offset, and commit at the end of each page
        (a commit that fails to reach the server is made at the next page instead).
        Ends quietly when the client is closed."""
        self._stub_or_raise()  # a closed client refuses to start
        failures = 0
        committed: int | None = None  # the consumer's offset on the server, once known
        while True:
            try:
                if consumer is not None and committed is None:
                    committed = await self._committed_or_none(consumer, topic, timeout)
                    cursor = cursor if committed is None else committed + 1
                    committed = cursor - 1 if committed is None else committed
                async with contextlib.aclosing(pages(cursor)) as stream:
                    async for page in stream:
                        failures = 0  # the server answered: count failures anew
                        for message in page:
                            if message.offset < cursor:
                                continue  # already yielded before a reconnect
                            cursor = message.offset + 1
                            yield message
                        committed = await self._commit_page(
                            consumer, topic, committed, cursor, timeout
                        )
                if not follow:
                    await self._commit_page(consumer, topic, committed, cursor, timeout)
                    return
                reason = "the server ended the stream"
            except grpc.RpcError as exc:
                if self._closed:
                    return
                if exc.code() not in RESUMABLE or (
                    max_failures is not None and failures >= max_failures
                ):
                    raise self._error(exc, op, None) from exc
                reason = exc.details() or "unavailable"
            except (asyncio.CancelledError, RuntimeError):
                if self._closed_under_us():
                    return  # close() cancelled the call, or came between two calls
                raise
            delay = backoff(failures, BACKOFF_FIRST, RECONNECT_BACKOFF_MAX)
            failures += 1
            log.warning(
                "%s: %s; reconnecting in %.1f s to go on at offset %d",
                op.action,
                reason,
                delay,
                cursor,
            )
            await asyncio.sleep(delay)
            if self._closed:
                return

    async def _commit_page(
        self,
        consumer: str | None,
        topic: str,
        committed: int | None,
        cursor: int,
        timeout: float | None,
    ) -> int | None:
        """Commit up to cursor - 1 (the last message yielded) unless it is already; returns
        what is committed now. Raises grpc.RpcError."""
        if consumer is None or committed is None or cursor - 1 <= committed or self._closed:
            return committed
        await self._stub_or_raise().CommitOffset(
            smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=cursor - 1),
            timeout=timeout,
        )
        return cursor - 1

    async def _committed_or_none(
        self, consumer: str, topic: str, timeout: float | None
    ) -> int | None:
        """The consumer's committed offset, None if it has none. Raises grpc.RpcError."""
        try:
            response = await self._stub_or_raise().GetCommittedOffset(
                smq_pb2.GetCommittedOffsetRequest(consumer=consumer, topic=topic),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None  # no commit, or no topic: then the first page says so
        return int(response.offset)
