"""Reading that survives reconnects: `iter_messages` and `subscribe` go on at the next
offset after the server restarts or the connection drops, and commit a named
consumer's offset page by page. Runs in the caller's thread, inside its iterator.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import Final

import grpc

from .._proto import smq_pb2
from ..retry import backoff
from .calls import BACKOFF_FIRST, Calls
from .transport import RESUMABLE, Op
from .types import Message

log = logging.getLogger("smq.client")

RECONNECT_BACKOFF_MAX: Final = 5.0  # iterators that reconnect forever wait at most this


class Resuming(Calls):
    """The resuming loop under Client's iterators."""

    def _resuming(
        self,
        pages: Callable[[int], Generator[list[Message], None, None]],
        cursor: int,
        op: Op,
        max_failures: int | None,
        follow: bool,
        consumer: str | None = None,
        topic: str = "",
        timeout: float | None = None,
    ) -> Iterator[Message]:
        """Yield messages from `pages(cursor)`, reopening it at the next offset after
        UNAVAILABLE (up to `max_failures` times in a row; None: forever). With a
        `consumer`: start after its committed offset, and commit at the end of each page
        (a commit that fails to reach the server is made at the next page instead)."""
        failures = 0
        committed: int | None = None  # the consumer's offset on the server, once known
        while True:
            try:
                if consumer is not None and committed is None:
                    committed = self._committed_or_none(consumer, topic, timeout)
                    cursor = cursor if committed is None else committed + 1
                    committed = cursor - 1 if committed is None else committed
                with contextlib.closing(pages(cursor)) as stream:
                    for page in stream:
                        failures = 0  # the server answered: count failures anew
                        for message in page:
                            if message.offset < cursor:
                                continue  # already yielded before a reconnect
                            cursor = message.offset + 1
                            yield message
                        committed = self._commit_page(consumer, topic, committed, cursor, timeout)
                if not follow:
                    self._commit_page(consumer, topic, committed, cursor, timeout)
                    return
                reason = "the server ended the stream"
            except grpc.RpcError as exc:
                if self.closed:
                    return
                diagnosis = self._diagnose(exc)
                if (
                    exc.code() not in RESUMABLE
                    or (max_failures is not None and failures >= max_failures)
                    or (diagnosis is not None and diagnosis.lasting)  # reconnecting cannot help
                ):
                    raise self._translated(exc, op, None, diagnosis) from exc
                reason = diagnosis.problem if diagnosis else exc.details() or "unavailable"
            delay = backoff(failures, BACKOFF_FIRST, RECONNECT_BACKOFF_MAX)
            failures += 1
            log.warning(
                "%s: %s; reconnecting in %.1f s to go on at offset %d",
                op.action,
                reason,
                delay,
                cursor,
            )
            time.sleep(delay)
            if self.closed:
                return

    def _commit_page(
        self,
        consumer: str | None,
        topic: str,
        committed: int | None,
        cursor: int,
        timeout: float | None,
    ) -> int | None:
        """Commit up to cursor - 1 (the last message yielded) unless it is already; returns
        what is committed now. Raises grpc.RpcError."""
        if consumer is None or committed is None or cursor - 1 <= committed or self.closed:
            return committed
        self._stub_or_raise().CommitOffset(
            smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=cursor - 1),
            timeout=timeout,
        )
        return cursor - 1

    def _committed_or_none(self, consumer: str, topic: str, timeout: float | None) -> int | None:
        """The consumer's committed offset, None if it has none. Raises grpc.RpcError."""
        try:
            return (
                self._stub_or_raise()
                .GetCommittedOffset(
                    smq_pb2.GetCommittedOffsetRequest(consumer=consumer, topic=topic),
                    timeout=timeout,
                )
                .offset
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None  # no commit, or no topic: then the first page says so
