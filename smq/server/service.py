"""The queue's rules, independent of gRPC and of SQLite.

QueueService checks every request against docs/wire.md's semantics, sends writes to the
group-commit writer, reads through storage, and lets streams wait for new commits:
each topic has a condition that the writer's commit callback notifies, so a waiting
stream wakes at once on a commit, on its own cancellation and on shutdown.

Its view of the topics (`_topics`) is only ever updated after a commit, so anything
it says exists can be read back from the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..domain import ON_FULL_CHOICES, TopicPolicy, check_name
from ..errors import (
    InvalidArgument,
    MessageTooLarge,
    NoCommittedOffset,
    NotFound,
    OffsetNotFound,
    OffsetOutOfRange,
    PermissionDenied,
    SMQError,
    TopicEmpty,
    TopicNotFound,
    Unavailable,
)
from . import encoding
from .clock import MessageClock
from .ops import (
    STREAM_BYTES,
    STREAM_SECONDS,
    Append,
    Barrier,
    CommitOffset,
    CreateTopic,
    DeleteConsumer,
    DeleteTopic,
    SetPolicy,
    StreamAppend,
    Trim,
    WriteOp,
)
from .storage import Storage
from .streams import Follower, PageLimits, StreamPlaces, Unlimited
from .topic_state import TopicState
from .write_queue import SMALL_WRITE, WriteQueue
from .writer import GroupCommitWriter

log = logging.getLogger(__name__)

DEFAULT_PAGE_MESSAGES = 100
MAX_PAGE_MESSAGES = 10_000
# Replies stay below gRPC's default 4 MiB receive limit, so default clients can read
# any page (a single message larger than this still travels alone). Counted as encoded
# on the wire (smq/server/encoding.py), framing included.
PAGE_BYTES = 3 * 1024**2
# StreamConsume sends a page message by message and holds the rest meanwhile: smaller.
STREAM_PAGE_BYTES = 256 * 1024
STREAM_PAGE_MESSAGES = 1_000
WRITE_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Limits:
    max_message_size: int = 1024**2
    max_streams: int = 64
    allow_remote_writes: bool = True
    max_consumers_per_topic: int = 1000
    # Retention and disk-full behaviour of topics that do not override it.
    topic_defaults: TopicPolicy = TopicPolicy(0, 0, 0, "reject", False)


@dataclasses.dataclass(frozen=True)
class ConsumerState:
    consumer: str
    topic: str
    committed_offset: int
    lag: int
    updated_at: int


@dataclasses.dataclass(frozen=True)
class Totals:
    """What GetServerInfo reports: the writer's commits since start (transactions, the
    writes and messages they carried) and what is stored now."""

    commits: int
    committed_writes: int
    committed_messages: int
    topics: int
    stored_messages: int
    stored_bytes: int


@dataclasses.dataclass(frozen=True)
class Page:
    """Messages read in one go: (offset, payload) pairs, ascending."""

    messages: list[tuple[int, bytes]]
    next_offset: int


class QueueService:
    """Topics, offsets, produce, consume, follow and trim, as docs/wire.md defines them."""

    def __init__(
        self, storage: Storage, limits: Limits = Limits(), clock: MessageClock | None = None
    ) -> None:
        """`clock`: the writer's message time (tests pass one they move)."""
        self.storage = storage
        self.limits = limits
        self._lock = threading.Lock()
        self._topics: dict[str, TopicState] = {}
        self._changed: dict[str, threading.Condition] = {}
        self._closing = False
        # Open streams, oldest first: their owner (connection, topic) or None, and how to end one.
        self.streams = StreamPlaces(limits.max_streams)
        self.write_queue = WriteQueue()  # large writes, see smq/server/write_queue.py
        self.writer = GroupCommitWriter(
            storage, on_commit=self._committed, defaults=limits.topic_defaults, clock=clock
        )
        self._committed(self.writer.committed_topics())

    # -- lifecycle --------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Wake every waiting stream; they end with Unavailable. Writes still work."""
        with self._lock:
            self._closing = True
            for condition in self._changed.values():
                condition.notify_all()

    def close(self) -> None:
        """Finish queued writes, stop the writer, close the database."""
        self.begin_shutdown()
        self.writer.close()
        self.storage.close()

    def liveness_problem(self, timeout: float) -> str | None:
        """Liveness: None when the writer thread runs, completes an (empty) write
        transaction within `timeout` seconds and the file reads (Storage.check_readable);
        else what failed."""
        if not self.writer.is_alive():
            return "the writer thread has stopped"
        try:
            self.writer.submit(Barrier()).wait(timeout)
            self.storage.check_readable()
        except SMQError as exc:
            return str(exc)
        return None

    # -- topics and offsets -------------------------------------------------------

    def topics(self) -> list[TopicState]:
        """Every topic with its counters, by name."""
        with self._lock:
            return sorted(self._topics.values(), key=lambda t: t.name)

    def totals(self) -> Totals:
        topics = self.topics()
        return Totals(
            commits=self.writer.commits,
            committed_writes=self.writer.committed_ops,
            committed_messages=self.writer.committed_messages,
            topics=len(topics),
            stored_messages=sum(t.message_count for t in topics),
            stored_bytes=sum(t.stored_bytes for t in topics),
        )

    def describe(self, name: str) -> TopicState:
        return self._topic(name)

    def policy(self, name: str) -> tuple[TopicPolicy, TopicPolicy]:
        """The topic's own overrides, and the policy in effect."""
        topic = self._topic(name)
        return topic.policy, topic.policy.over(self.limits.topic_defaults)

    def set_policy(self, name: str, policy: TopicPolicy) -> tuple[TopicPolicy, TopicPolicy]:
        """Replace the topic's overrides; they apply from this commit on (a lower limit
        trims at once)."""
        self._topic(name)
        for field in ("max_messages", "max_bytes", "max_age"):
            value = getattr(policy, field)
            if value is not None and value < 0:
                raise InvalidArgument(f"{field} must be 0 (no limit) or more, not {value}")
        if policy.on_full is not None and policy.on_full not in ON_FULL_CHOICES:
            raise InvalidArgument(
                f"on_full must be one of {', '.join(ON_FULL_CHOICES)}, not {policy.on_full!r}"
            )
        self._write(SetPolicy(name, policy))
        return self.policy(name)

    # -- durable consumers --------------------------------------------------------------

    def commit_offset(self, consumer: str, name: str, offset: int) -> None:
        """Record that `consumer` has processed `name` up to and including `offset`."""
        check_name(consumer, "consumer name")
        topic = self._topic(name)
        if offset < 0:
            raise InvalidArgument(
                f"offset {offset} is negative: commit 0 to start from the beginning"
            )
        if offset >= topic.next_offset:
            raise OffsetOutOfRange(
                f"offset {offset} is above the latest offset {topic.next_offset - 1}"
            )
        self._write(CommitOffset(consumer, name, offset, self.limits.max_consumers_per_topic))

    def committed_offset(self, consumer: str, name: str) -> int:
        check_name(consumer, "consumer name")
        offset = self.storage.committed_offset(consumer, self._topic(name).id)
        if offset is None:
            raise NoCommittedOffset(
                f"consumer {consumer!r} has no committed offset on topic {name!r}"
            )
        return offset

    def consumers(self, topic: str = "", consumer: str = "") -> list[ConsumerState]:
        """Named consumers with their committed offsets and lag, optionally filtered."""
        if topic:
            self._topic(topic)
        with self._lock:
            by_id = {t.id: t for t in self._topics.values()}
        found = []
        for name, topic_id, offset, updated_at in self.storage.consumers():
            state = by_id.get(topic_id)
            if state is None or (topic and state.name != topic) or (consumer and name != consumer):
                continue
            found.append(
                ConsumerState(name, state.name, offset, state.lag_after(offset), updated_at)
            )
        return sorted(found, key=lambda c: (c.consumer, c.topic))

    def delete_consumer(self, consumer: str, topic: str = "") -> int:
        """Forget a named consumer on one topic, or on all. NotFound if it had no offset."""
        check_name(consumer, "consumer name")
        if topic:
            self._topic(topic)
        if not self._write(DeleteConsumer(consumer, [topic] if topic else None)):
            raise NotFound(
                f"consumer {consumer!r} has no committed offset"
                + (f" on topic {topic!r}" if topic else "")
            )
        return 1

    def delete_topic(self, name: str) -> None:
        """Delete a topic and its messages; its streams end with NOT_FOUND."""
        self._topic(name)
        self._write(DeleteTopic(name))

    def create_topic(self, name: str) -> bool:
        """Create the topic unless it exists. True if it was created."""
        check_name(name)
        if name in self._topics:
            return False
        return self._write(CreateTopic(name))

    def earliest_offset(self, name: str) -> int:
        topic = self._topic(name)
        if topic.earliest is None:
            raise TopicEmpty(name)
        return topic.earliest

    def latest_offset(self, name: str) -> int:
        topic = self._topic(name)
        if topic.latest is None:
            raise TopicEmpty(name)
        return topic.latest

    # -- writing ------------------------------------------------------------------

    def check_may_write(self, local: bool) -> None:
        """Remote (TCP) writers need --allow-remote-writes; local (Unix socket) ones never do."""
        if not local and not self.limits.allow_remote_writes:
            raise PermissionDenied("remote writes are disabled on this server")

    def produce(self, name: str, payload: bytes, source: object = None) -> int:
        """Append one message; its offset once committed. `source`: see write_lanes.py."""
        self._check_message(name, payload)
        with self.write_queue.room(len(payload)):
            return self._write(Append.to_topic(name, [payload], source=source))[1]

    def produce_stream(
        self,
        messages: Iterable[tuple[str, bytes]],
        committed: Callable[[int], None] = lambda count: None,
        source: object = None,
    ) -> int:
        """Append (topic, payload) pairs in order; returns the last offset (0 if none).
        `committed(n)` is called each time the next n messages are committed. Messages
        go to the writer while the stream is still being read: into the op queued for it
        (StreamAppend) until the writer takes that one, then into the next, queued once
        the previous one is committed. When a message had to wait for that commit, the
        stream is busy and its next op waits STREAM_SECONDS to fill up: a fast stream
        makes big transactions, a slow one's messages go as they come. An op of large
        messages takes room in the write queue first (smq/server/write_queue.py). On the
        first bad message the ones before it are committed, then the error raised."""
        last = 0
        op: StreamAppend | None = None
        checked = None  # the topic name of the previous message, already checked
        try:
            for name, payload in messages:
                if name != checked:
                    self._topic(name)  # a topic deleted later is caught by the writer
                    checked = name
                self._check_size(payload)
                if op is not None and op.add(name, payload):
                    continue
                not_before = 0.0
                if op is not None:
                    if not op.done():  # a busy stream: let the next op fill a while
                        not_before = time.monotonic() + STREAM_SECONDS
                    last = self._wait_stream_op(op, committed) or last
                new = StreamAppend(name, payload, not_before, source)
                self.write_queue.room_until_done(new, STREAM_BYTES, len(payload) > SMALL_WRITE)
                op = new
                self.writer.submit(op)
        finally:
            # Whatever ends the stream, what was accepted before it is committed.
            if op is not None:
                last = self._wait_stream_op(op, committed) or last
        return last

    @staticmethod
    def _wait_stream_op(op: StreamAppend, committed: Callable[[int], None]) -> int:
        """Wait for a stream's op; its last offset (0 if none)."""
        try:
            return op.wait(WRITE_TIMEOUT)[1]
        finally:
            if op.done():
                committed(op.messages)

    def produce_batch(
        self, name: str, payloads: list[bytes], source: Any = None
    ) -> tuple[int, int]:
        """Append all payloads to one topic in one transaction, or none of them.
        Returns (first offset, last offset); (0, 0) for an empty batch."""
        self._topic(name)  # an empty batch still names a valid, existing topic
        if not payloads:
            return (0, 0)
        if max(map(len, payloads)) > self.limits.max_message_size:  # one pass at C speed
            self._check_size(max(payloads, key=len))
        with self.write_queue.room(sum(map(len, payloads))):
            return self._write(Append.to_topic(name, payloads, atomic=True, source=source))

    def trim(self, name: str, until: int) -> int:
        """Delete every message with offset <= until; returns how many were deleted."""
        self._topic(name)
        if until < 1:
            return 0
        return self._write(Trim(name, until))

    def _check_message(self, name: str, payload: bytes) -> None:
        self._topic(name)
        self._check_size(payload)

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.limits.max_message_size:
            raise MessageTooLarge(
                f"message of {len(payload)} bytes is larger than the server's maximum "
                f"of {self.limits.max_message_size} bytes"
            )

    def _write(self, op: WriteOp) -> Any:
        return self.writer.execute(op, WRITE_TIMEOUT)

    # -- reading ------------------------------------------------------------------

    def consume(self, name: str, offset: int) -> bytes:
        """The message at offset."""
        topic = self._topic(name)
        if offset < 1:
            raise OffsetNotFound(f"offset {offset} is below 1: offsets start at 1")
        if offset >= topic.next_offset:
            raise OffsetOutOfRange(
                f"offset {offset} is above the latest offset {topic.next_offset - 1}"
            )
        payload = self.storage.read_one(topic.key_base, offset)
        if payload is None:
            topic = self._topic(name)  # as of now: a trim may have come since the read began
            if topic.earliest is None:
                raise OffsetNotFound(
                    f"offset {offset} was deleted; the topic is empty "
                    f"(the next message gets offset {topic.next_offset})"
                )
            raise OffsetNotFound(f"offset {offset} was deleted; the earliest is {topic.earliest}")
        return payload

    def read(self, name: str, start_offset: int, limit: int, max_bytes: int = PAGE_BYTES) -> Page:
        """BulkRetrieve: messages with offset >= start_offset, at most page_messages(limit)
        of them and `max_bytes` encoded (but at least one)."""
        topic = self._topic(name)
        messages = self._read_page(topic, max(start_offset, 1), page_messages(limit), max_bytes)
        return Page(messages, messages[-1][0] + 1 if messages else start_offset)

    def _read_page(
        self, topic: TopicState, start: int, count: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Up to `count` messages from `start` whose encoded size fits `max_bytes`, at least
        one (the storage counts payloads only, never more than their encoding)."""
        page = self.storage.read_page(topic.key_base, start, count, max_bytes)
        return encoding.fit(page, max_bytes)

    # -- streams --------------------------------------------------------------------

    def stream_slot(
        self, owner: tuple[str, str] | None = None, end: Callable[[], object] = lambda: None
    ) -> contextlib.AbstractContextManager[None]:
        """Hold one of the --max-streams places for the duration of a stream (see
        StreamPlaces.slot); none while the server shuts down."""
        if self._closing:
            raise Unavailable("server is shutting down")
        return self.streams.slot(owner, end)

    def follow(
        self,
        name: str,
        from_offset: int,
        heartbeat: float,
        page_messages: int = MAX_PAGE_MESSAGES,
        page_bytes: int = PAGE_BYTES,
        limits: PageLimits | None = None,
    ) -> Follower:
        """A stream's reader of pages from max(from_offset, earliest), then of each new
        commit, each of at most `page_messages` messages (<= 0: the maximum) and
        `page_bytes` encoded bytes, as `limits` allows; see Follower.next_page."""
        self._topic(name)
        size = MAX_PAGE_MESSAGES if page_messages <= 0 else min(page_messages, MAX_PAGE_MESSAGES)
        return Follower(
            self, name, max(from_offset, 1), heartbeat, (page_bytes, size), limits or Unlimited()
        )

    def _wait_for_offset(self, name: str, offset: int, timeout: float, follower: Follower) -> bool:
        """Wait until `offset` is committed in the topic. False on timeout or cancel."""
        with self._lock:
            condition = self._changed.get(name)
            if condition is None:
                condition = self._changed[name] = threading.Condition(self._lock)
            return condition.wait_for(
                lambda: (
                    self._closing
                    or follower.cancelled
                    or self._topic_locked(name).next_offset > offset
                ),
                timeout,
            )

    def _wake(self, name: str) -> None:
        with self._lock:
            condition = self._changed.get(name)
            if condition is not None:
                condition.notify_all()

    # -- the committed view ---------------------------------------------------------

    def _committed(self, changed: list[TopicState]) -> None:
        """Called by the writer after each commit with copies of the topics it changed."""
        with self._lock:
            for topic in changed:
                if topic.deleted:
                    self._topics.pop(topic.name, None)
                else:
                    self._topics[topic.name] = topic
                condition = self._changed.get(topic.name)
                if condition is not None:
                    condition.notify_all()

    def _topic(self, name: str) -> TopicState:
        check_name(name)
        with self._lock:
            return self._topic_locked(name)

    def _topic_locked(self, name: str) -> TopicState:
        topic = self._topics.get(name)
        if topic is None:
            raise TopicNotFound(name)
        return topic

    @property
    def closing(self) -> bool:
        return self._closing


def page_messages(limit: int) -> int:
    """How many messages a BulkRetrieve page of `limit` may have."""
    return DEFAULT_PAGE_MESSAGES if limit <= 0 else min(limit, MAX_PAGE_MESSAGES)
