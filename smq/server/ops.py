"""The writes the writer applies: each a WriteOp whose `apply` runs inside a group's
transaction, in the writer's thread (or a lone caller's, under the commit lock), and
whose caller waits in its own thread for the commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..domain import TopicPolicy
from ..errors import (
    InvalidArgument,
    SMQError,
    StorageFull,
    TooManyConsumers,
    TopicNotFound,
    Unavailable,
)
from .topic_state import TopicState

if TYPE_CHECKING:
    from .writer import GroupCommitWriter

STREAM_MESSAGES = 1_000  # a StreamAppend takes at most this many messages...
STREAM_BYTES = 1024**2  # ...and bytes (a large write holds the writer: write_lanes.py),
STREAM_SECONDS = 0.002  # and a stream commits at most this often while it is busy


class Caller:
    """Who sent a write (its `WriteOp.source`): the connection (`peer`: equal and hashed
    by it, since writes of one connection keep their order, write_lanes.py) and whether
    its call still waits for the answer (`waits`). A write whose caller gave up before it
    was queued is not written (writer.py): it would be stored after the caller's next."""

    __slots__ = ("peer", "waits")

    def __init__(self, peer: str, waits: Callable[[], bool]) -> None:
        self.peer = peer
        self.waits = waits

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Caller) and other.peer == self.peer

    def __hash__(self) -> int:
        return hash(self.peer)


class WriteOp:
    """One unit of work for the writer. `apply` runs inside the group's transaction
    and sets `result` or `error`; the caller's `wait()` returns once it is committed.
    An op that sets `unfinished` is applied again in a transaction of its own after
    the commit, until it no longer does (deletions go in steps: see Trim)."""

    messages = 0
    bytes = 0
    not_before = 0.0  # monotonic time before which the writer does not start its group
    unfinished = False
    source: object = None  # the caller's connection, if any: its writes stay in order

    def __init__(self) -> None:
        self.result: Any = None
        self.error: SMQError | None = None
        # Held until the op is committed. A bare lock rather than an Event: an Event is
        # a Condition written in Python, and there is one per produced message.
        self._pending = threading.Lock()
        self._pending.acquire()

    def apply(self, writer: GroupCommitWriter) -> None:
        raise NotImplementedError

    def seal(self) -> None:
        """Taken into a group: from now on its size is what it commits (StreamAppend)."""

    def done(self) -> bool:
        return not self._pending.locked()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until committed; return the result or raise the op's error."""
        if not self._pending.acquire(timeout=-1 if timeout is None else timeout):
            raise Unavailable("the storage writer did not answer in time")
        self._pending.release()  # finished for good: done() and later waits see it
        if self.error is not None:
            raise self.error
        return self.result

    def _finish(self) -> None:
        self._pending.release()


class CreateTopic(WriteOp):
    """Create a topic if it does not exist (idempotent). Result: True if created."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def apply(self, writer: GroupCommitWriter) -> None:
        if self.name in writer.topics:
            self.result = False
            return
        writer.topics[self.name] = writer.storage.insert_topic(self.name)
        writer.touched.add(self.name)
        self.result = True


class Append(WriteOp):
    """Append (topic, payload) pairs in order. Result: (first offset, last offset).

    At an unknown topic it stops with TopicNotFound; what it appended before that
    is committed and `result` covers it (StreamProduce's rule). With `atomic`, every
    topic is checked first, so it appends all or nothing.

    The pairs are kept as runs of consecutive payloads to one topic, grouped here in
    the caller's thread so that the writer's time goes to SQLite alone.
    """

    def __init__(self, items: Sequence[tuple[str, bytes]], atomic: bool = False) -> None:
        runs: list[tuple[str, list[bytes]]] = []
        for name, payload in items:
            if runs and runs[-1][0] == name:
                runs[-1][1].append(payload)
            else:
                runs.append((name, [payload]))
        self._init(runs, atomic)

    @classmethod
    def to_topic(
        cls, name: str, payloads: list[bytes], atomic: bool = False, source: object = None
    ) -> Append:
        """Payloads to one topic (ProduceBatch, Produce), without pairing each one."""
        op = cls.__new__(cls)
        op._init([(name, payloads)] if payloads else [], atomic)
        op.source = source
        return op

    def _init(self, runs: list[tuple[str, list[bytes]]], atomic: bool) -> None:
        WriteOp.__init__(self)
        self.runs = runs
        self.atomic = atomic
        self.run_bytes = [sum(map(len, payloads)) for _, payloads in runs]
        self.messages = sum(len(payloads) for _, payloads in runs)
        self.bytes = sum(self.run_bytes)

    def apply(self, writer: GroupCommitWriter) -> None:
        if self.atomic:
            self.error = self._refusal(writer)
            if self.error is not None:
                return
        first = last = 0
        for (name, payloads), size in zip(self.runs, self.run_bytes):
            topic = writer.topics.get(name)
            if topic is None:
                self.error = TopicNotFound(name)
                break
            kept = _larger_than_max_bytes(writer.policy_of(topic), payloads)
            if kept is not None:  # StreamProduce's rule: what came before it stays
                self.error = _too_large_for(topic, payloads[kept], writer.policy_of(topic))
                payloads = payloads[:kept]
                size = sum(map(len, payloads))
            if payloads:
                offset, full = self._append_run(writer, topic, payloads, size)
                first = first or offset
                last = topic.next_offset - 1
                self.error = full or self.error
            if self.error is not None:
                break
        self.result = (first, last)

    def _append_run(
        self, writer: GroupCommitWriter, topic: TopicState, payloads: list[bytes], size: int
    ) -> tuple[int, StorageFull | None]:
        """Append a run of payloads; (offset of the first appended or 0, the refusal if
        the disk budget took only part). An atomic append raises instead, and fails
        whole; otherwise what fits before the budget is reached stays (StreamProduce's
        rule), one message at a time on that rare path."""
        try:
            return writer.append(topic, payloads, size), None
        except StorageFull as full:
            if self.atomic:
                raise
            refusal = full
        first = 0
        for payload in payloads:
            try:
                offset = writer.append(topic, [payload], len(payload))
            except StorageFull as full:
                return first, full
            first = first or offset
        return first, refusal

    def _refusal(self, writer: GroupCommitWriter) -> SMQError | None:
        """Why an atomic append cannot be stored whole, or None: a missing topic, or a
        message that the topic's retention would delete in the commit that stores it."""
        for name, payloads in self.runs:
            topic = writer.topics.get(name)
            if topic is None:
                return TopicNotFound(name)
            policy = writer.policy_of(topic)
            too_large = _larger_than_max_bytes(policy, payloads)
            if too_large is not None:
                return _too_large_for(topic, payloads[too_large], policy)
        return None


def _larger_than_max_bytes(policy: TopicPolicy, payloads: list[bytes]) -> int | None:
    """The index of the first payload larger than the policy's max_bytes, or None."""
    if not policy.max_bytes or max(map(len, payloads)) <= policy.max_bytes:
        return None
    return next(i for i, p in enumerate(payloads) if len(p) > policy.max_bytes)


def _too_large_for(topic: TopicState, payload: bytes, policy: TopicPolicy) -> InvalidArgument:
    return InvalidArgument(
        f"message of {len(payload)} bytes is larger than topic {topic.name!r}'s max_bytes of "
        f"{policy.max_bytes}: retention would delete it as soon as it is stored"
    )


class StreamAppend(Append):
    """The Append of a StreamProduce stream, which goes on adding messages to it until
    the writer takes it: a stream's messages wait in the writer's queue, not in the
    handler, so none is held back when the client pauses. The writer commits it no
    earlier than `not_before`, which spaces a fast stream's commits (STREAM_SECONDS)
    so that each carries many messages: a commit costs ~200 us of CPU, and a stream
    committing every few messages spent more on commits than on gRPC."""

    def __init__(self, name: str, payload: bytes, not_before: float, source: object = None) -> None:
        self._init([(name, [payload])], atomic=False)
        self.not_before = not_before
        self.source = source
        self._lock = threading.Lock()
        self._sealed = False

    def add(self, name: str, payload: bytes) -> bool:
        """Add a message, unless the writer took the op already or it is full."""
        with self._lock:
            if self._sealed or self.messages >= STREAM_MESSAGES or self.bytes >= STREAM_BYTES:
                return False
            if self.runs[-1][0] == name:
                self.runs[-1][1].append(payload)
                self.run_bytes[-1] += len(payload)
            else:
                self.runs.append((name, [payload]))
                self.run_bytes.append(len(payload))
            self.messages += 1
            self.bytes += len(payload)
            return True

    def seal(self) -> None:
        with self._lock:
            self._sealed = True

    def apply(self, writer: GroupCommitWriter) -> None:
        self.seal()
        super().apply(writer)


class Trim(WriteOp):
    """Delete messages with offset <= until. Result: how many were deleted.

    A large trim goes in steps of about Storage.trim_step bytes, one transaction each:
    every page a deletion touches goes to the WAL, and at a full disk only the reserve
    is left for it (storage.free_space). Each step is a whole trim of a prefix."""

    def __init__(self, name: str, until: int) -> None:
        super().__init__()
        self.name = name
        self.until = until
        self._from: int | None = None  # the earliest offset before the first step

    def apply(self, writer: GroupCommitWriter) -> None:
        topic = writer.topics.get(self.name)
        if topic is None:
            self.error = TopicNotFound(self.name)
            return
        if self._from is None:
            self._from = topic.earliest or topic.next_offset
        deleted = writer.trim(topic, writer.trim_step_end(topic, self.until))
        self.unfinished = (
            bool(deleted) and topic.earliest is not None and topic.earliest <= self.until
        )
        # Trims remove a prefix: what they took is the distance the earliest moved.
        self.result = (topic.earliest or topic.next_offset) - self._from


class DeleteTopic(WriteOp):
    """Delete a topic and its messages. Result: True if it existed."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def apply(self, writer: GroupCommitWriter) -> None:
        topic = writer.topics.get(self.name)
        if topic is None:
            self.error = TopicNotFound(self.name)
            return
        if (
            topic.latest is not None
            and topic.stored_bytes > writer.storage.trim_step
            and writer.trim(topic, writer.trim_step_end(topic, topic.latest))
        ):
            self.unfinished = True  # its messages go first, in steps as for a large Trim
            return
        del writer.topics[self.name]
        writer.storage.delete_topic(topic)
        writer.deleted.append(topic)
        self.result = True


class SetPolicy(WriteOp):
    """Store a topic's retention / disk-full policy; it applies from this commit on."""

    def __init__(self, name: str, policy: TopicPolicy) -> None:
        super().__init__()
        self.name = name
        self.policy = policy

    def apply(self, writer: GroupCommitWriter) -> None:
        topic = writer.topics.get(self.name)
        if topic is None:
            self.error = TopicNotFound(self.name)
            return
        writer.storage.set_policy(topic, self.policy)
        writer.touched.add(self.name)
        self.result = True


class CommitOffset(WriteOp):
    """Store a named consumer's committed offset on a topic. A consumer new to the topic
    is refused (TooManyConsumers) once the topic has `max_consumers`: counted here, in
    the one writer thread, so concurrent commits cannot pass the limit together."""

    def __init__(self, consumer: str, name: str, offset: int, max_consumers: int) -> None:
        super().__init__()
        self.consumer, self.name, self.offset = consumer, name, offset
        self.max_consumers = max_consumers

    def apply(self, writer: GroupCommitWriter) -> None:
        topic = writer.topics.get(self.name)
        if topic is None:
            self.error = TopicNotFound(self.name)
            return
        storage = writer.storage
        if not storage.update_committed(self.consumer, topic, self.offset):
            if storage.consumer_count(topic) >= self.max_consumers:
                self.error = TooManyConsumers(
                    f"topic {self.name!r} has {self.max_consumers} named consumers, the most "
                    f"this server allows (--max-consumers-per-topic): delete one it no longer "
                    f"needs (smq consumer delete NAME --topic {self.name}), or raise the limit"
                )
                return
            storage.insert_consumer(self.consumer, topic, self.offset)
        writer.touched.add(self.name)
        self.result = True


class DeleteConsumer(WriteOp):
    """Forget a named consumer on some topics (all when `names` is None). Result: how many."""

    def __init__(self, consumer: str, names: list[str] | None) -> None:
        super().__init__()
        self.consumer, self.names = consumer, names

    def apply(self, writer: GroupCommitWriter) -> None:
        names = list(writer.topics) if self.names is None else self.names
        topics = [writer.topics[n] for n in names if n in writer.topics]
        self.result = writer.storage.delete_consumer(self.consumer, topics)
        writer.touched.update(t.name for t in topics)


class EnforceAge(WriteOp):
    """Trim what is older than each topic's max_age (the writer's own periodic op)."""

    def apply(self, writer: GroupCommitWriter) -> None:
        now = writer.clock.now
        self.unfinished = False
        for topic in writer.topics.values():
            max_age = writer.policy_of(topic).max_age
            if max_age and topic.earliest is not None:
                until = writer.storage.offset_older_than(topic, now - max_age)
                deleted = writer.retention_trim(topic, writer.trim_step_end(topic, until))
                self.unfinished |= (
                    bool(deleted) and topic.earliest is not None and topic.earliest <= until
                )


class Barrier(WriteOp):
    """Does nothing; answers once the writer has reached it (a liveness probe)."""

    def apply(self, writer: GroupCommitWriter) -> None:
        self.result = True
