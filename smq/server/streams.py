"""What streams hold: their places (--max-streams), and the reader of a stream's pages.

- StreamPlaces: one place per open stream (StreamConsume, Subscribe, StreamProduce,
  reflection). At the cap, a new consuming stream of a connection on a topic ends that
  connection's oldest stream there; anything else is refused. Any thread.
- Follower: a stream's reader of pages of a topic, from its cursor on, then of each new
  commit; it waits on the service's condition for the topic. The stream's thread reads;
  any thread may cancel.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from ..errors import Overloaded, Unavailable
from .topic_state import TopicState

if TYPE_CHECKING:
    from .service import QueueService

log = logging.getLogger("smq.server.service")
REPLACEMENT_LOG_SECONDS = 60


class StreamPlaces:
    """The --max-streams places of open streams."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._lock = threading.Lock()
        # Open streams, oldest first: their owner (connection, topic) or None, and how to end one.
        self._streams: dict[object, tuple[tuple[str, str] | None, Callable[[], object]]] = {}
        self._replaced, self._replaced_logged_at = 0, -float(REPLACEMENT_LOG_SECONDS)

    @contextlib.contextmanager
    def slot(
        self, owner: tuple[str, str] | None = None, end: Callable[[], object] = lambda: None
    ) -> Iterator[None]:
        """Hold one place for the duration of a stream.

        `owner`: the (connection, topic) of a consuming stream. When every place is taken,
        the oldest stream of the same owner is ended (`end`) to make room: the original Go
        client leaves a StreamConsume open when its callback stops it, and a program doing
        that in a loop would otherwise lock itself out. Anything else is refused."""
        with self._lock:
            end_oldest = None
            if len(self._streams) >= self.max_streams:
                end_oldest = self._take_oldest_stream_of(owner)
                if end_oldest is None:
                    raise Overloaded(
                        f"too many open streams (limit {self.max_streams}); "
                        "retry later or raise --max-streams"
                    )
                self._report_replacement(owner)
            place = object()
            self._streams[place] = (owner, end)
        try:
            if end_oldest is not None:
                end_oldest()
                end_oldest = None  # a reference kept here would keep the ended call alive in gRPC
            yield
        finally:
            with self._lock:
                self._streams.pop(place, None)

    def _report_replacement(self, owner: tuple[str, str] | None) -> None:
        """Log replaced streams at most once a minute: a looping client replaces one a turn.
        Called with the lock held (it counts them)."""
        self._replaced += 1
        now = time.monotonic()
        if owner is not None and now - self._replaced_logged_at >= REPLACEMENT_LOG_SECONDS:
            log.info(
                "ended the oldest stream of %s on %r to make room for a new one of the same "
                "connection (--max-streams %d; %d such since the last such line)",
                owner[0],
                owner[1],
                self.max_streams,
                self._replaced,
            )
            self._replaced, self._replaced_logged_at = 0, now

    def _take_oldest_stream_of(self, owner: tuple[str, str] | None) -> Callable[[], object] | None:
        """Forget the oldest open stream of `owner` and return how to end it; None if none."""
        if owner is None:
            return None
        oldest = next(
            (place for place, (held_by, _) in self._streams.items() if held_by == owner), None
        )
        return None if oldest is None else self._streams.pop(oldest)[1]


class PageLimits(Protocol):
    """How large a stream's next page may be (the memory budget, in the server)."""

    def take_page(self, max_bytes: int, max_messages: int) -> tuple[int, int]:
        """Called before each read: the (bytes, messages) the page may have, at most those asked."""

    def give_back(self) -> None:
        """The read found nothing: what `take` set aside is not needed."""


class Unlimited:
    """PageLimits that always allow the page asked for."""

    def take_page(self, max_bytes: int, max_messages: int) -> tuple[int, int]:
        return max_bytes, max_messages

    def give_back(self) -> None:
        pass


class Follower:
    """Reads a topic's pages for a stream; `cancel()` (any thread) ends it."""

    def __init__(
        self,
        service: QueueService,
        name: str,
        cursor: int,
        heartbeat: float,
        page_size: tuple[int, int],
        limits: PageLimits,
    ) -> None:
        self._service = service
        self._name = name
        self.cursor = cursor
        self._heartbeat = heartbeat
        self._page_size = page_size  # (encoded bytes, messages)
        self._limits = limits
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._service._wake(self._name)

    def next_page(self) -> list[tuple[int, bytes]] | None:
        """The next page from the cursor on; [] after `heartbeat` seconds idle (the caller
        sends a heartbeat); None once cancelled. Not a generator: a stream that is not
        read must not keep a page it already sent alive in a suspended frame."""
        service = self._service
        while not self.cancelled:
            if service.closing:
                raise Unavailable("server is shutting down")
            topic = service._topic(self._name)
            if topic.next_offset > self.cursor:
                page = self._read(topic)
                if page:
                    self.cursor = page[-1][0] + 1
                    return page
            # Nothing is stored from the cursor on, so every offset below the topic's next
            # one was deleted: wait for that one (waiting for an offset that already went
            # by would return at once, forever, and never send a heartbeat).
            self.cursor = max(self.cursor, topic.next_offset)
            waited = service._wait_for_offset(self._name, self.cursor, self._heartbeat, self)
            if not waited and not (self.cancelled or service.closing):
                return []
        return None

    def _read(self, topic: TopicState) -> list[tuple[int, bytes]]:
        max_bytes, max_messages = self._limits.take_page(*self._page_size)
        page = self._service._read_page(topic, self.cursor, max_messages, max_bytes)
        if not page:
            self._limits.give_back()
        return page
