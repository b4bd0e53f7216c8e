"""Group commit: one write transaction at a time, many writes per transaction.

Callers (gRPC threads) submit WriteOps and wait. The writer thread takes the op at
the head of the queue plus everything queued behind it (up to a size cap), applies
them all in one transaction, commits once (one fsync in full durability), and only
then releases every caller. While one commit is being fsynced, new ops pile up and
form the next group: the more concurrent writers, the more each commit carries.

Two refinements, both about the hand-off between callers and the writer thread:

- A lone writer commits its own op (`execute`): with nothing queued, no commit
  running and the last group a single op, waking the writer thread and being woken
  by it again costs more than the commit itself (two thread switches, each a GIL
  hand-off). The commit lock keeps transactions one at a time either way.
- A group waits briefly for the writers that are on their way: when N ops were about
  at the last commit (its own and those that queued up during it: N callers that
  each send their next write as soon as they are answered), the next group waits
  for N ops, up to twice a commit's time (1 to 2 ms), instead of committing the
  first arrival alone and the others one commit later. A lone writer never waits,
  and a wrong guess costs one wait: the next group expects what actually came.

If a group fails in storage (disk full, I/O error), nothing of it was committed;
its ops are retried one per transaction so that one bad op cannot fail the others.

At the disk budget, an Append to a drop-oldest topic trims that topic's oldest
messages in its own transaction, just enough for it to fit: the write and what it
dropped commit together, or neither does (a refused write has dropped nothing).

The writer owns the working topic counters (next offset, earliest, bytes). After each
commit it hands copies of the topics it changed to `on_commit`, which is how the
rest of the server learns what readers may now see.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .clock import MessageClock, describe_shift
from .log_throttle import Throttled
from .errors import (InvalidArgument, SMQError, StorageFailure, StorageFull, TooManyConsumers,
                     TopicNotFound, Unavailable)
from .storage import Storage, TopicPolicy, TopicState

log = logging.getLogger(__name__)

MAX_GROUP_MESSAGES = 20_000
MAX_GROUP_BYTES = 32 * 1024**2
TICK_SECONDS = 1.0  # age retention and giving space back run at most this often
# A measured disk budget above ROOM_TRUSTED_ABOVE is trusted for ROOM_SECONDS (see
# reserve_space): far more than the files (WAL included) can grow in that time.
ROOM_SECONDS = 0.1
ROOM_TRUSTED_ABOVE = 256 * 1024**2
SPACE_WARNING_SECONDS = 60  # a failing give-back of free pages is logged at most this often
DROPPED_LOG_SECONDS = 60  # what drop-oldest dropped is logged at most this often
ROW_OVERHEAD = 64  # bytes a stored message costs beyond its payload (keys, page slack)
MARK_OVERHEAD = 48  # and a time mark, the first message of a topic in a second
STREAM_MESSAGES = 1_000  # a StreamAppend takes at most this many messages...
STREAM_BYTES = 4 * 1024**2  # ...and bytes,
STREAM_SECONDS = 0.002  # and a stream commits at most this often while it is busy
# How long a group waits for the writers it expects: twice the recent commit time
# (fsync included), within these bounds. Measured with 2 and 4 unary producers.
GATHER_MIN_SECONDS = 0.001
GATHER_MAX_SECONDS = 0.002
GATHER_COMMITS = 2.0


class WriteOp:
    """One unit of work for the writer. `apply` runs inside the group's transaction
    and sets `result` or `error`; the caller's `wait()` returns once it is committed.
    An op that sets `unfinished` is applied again in a transaction of its own after
    the commit, until it no longer does (deletions go in steps: see Trim)."""

    messages = 0
    bytes = 0
    not_before = 0.0  # monotonic time before which the writer does not start its group
    unfinished = False

    def __init__(self) -> None:
        self.result: Any = None
        self.error: SMQError | None = None
        # Held until the op is committed. A bare lock rather than an Event: an Event is
        # a Condition written in Python, and there is one per produced message.
        self._pending = threading.Lock()
        self._pending.acquire()

    def apply(self, writer: GroupCommitWriter) -> None:
        raise NotImplementedError

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
    def to_topic(cls, name: str, payloads: list[bytes], atomic: bool = False) -> Append:
        """Payloads to one topic (ProduceBatch, Produce), without pairing each one."""
        op = cls.__new__(cls)
        op._init([(name, payloads)] if payloads else [], atomic)
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

    def _append_run(self, writer: GroupCommitWriter, topic: TopicState, payloads: list[bytes],
                    size: int) -> tuple[int, StorageFull | None]:
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
        f"{policy.max_bytes}: retention would delete it as soon as it is stored")


class StreamAppend(Append):
    """The Append of a StreamProduce stream, which goes on adding messages to it until
    the writer takes it: a stream's messages wait in the writer's queue, not in the
    handler, so none is held back when the client pauses. The writer commits it no
    earlier than `not_before`, which spaces a fast stream's commits (STREAM_SECONDS)
    so that each carries many messages: a commit costs ~200 us of CPU, and a stream
    committing every few messages spent more on commits than on gRPC."""

    def __init__(self, name: str, payload: bytes, not_before: float) -> None:
        self._init([(name, [payload])], atomic=False)
        self.not_before = not_before
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

    def apply(self, writer: GroupCommitWriter) -> None:
        with self._lock:
            self._sealed = True
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
        self.unfinished = bool(deleted) and topic.earliest is not None and topic.earliest <= self.until
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
        if (topic.latest is not None and topic.stored_bytes > writer.storage.trim_step
                and writer.trim(topic, writer.trim_step_end(topic, topic.latest))):
            self.unfinished = True  # its messages go first, in steps as for a large Trim
            return
        del writer.topics[self.name]
        writer.storage.delete_topic(topic)
        writer.deleted.append(topic)
        writer.space_to_give_back = True
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
                    f"needs (smq consumer delete NAME --topic {self.name}), or raise the limit")
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
                self.unfinished |= (bool(deleted) and topic.earliest is not None
                                    and topic.earliest <= until)


class Barrier(WriteOp):
    """Does nothing; answers once the writer has reached it (a liveness probe)."""

    def apply(self, writer: GroupCommitWriter) -> None:
        self.result = True


_STOP = object()



class GroupCommitWriter:
    """The single writer thread. Submit ops with `submit`; `close` drains and stops.

    `topics` holds the live topics; `touched` and `deleted` collect what the current
    group changed, for `on_commit`.
    """

    def __init__(self, storage: Storage,
                 on_commit: Callable[[list[TopicState]], None] = lambda topics: None,
                 defaults: TopicPolicy = TopicPolicy(0, 0, 0, "reject", False),
                 clock: MessageClock | None = None) -> None:
        self.storage = storage
        self.defaults = defaults
        self.clock = clock or MessageClock()
        self._room: int | None = None  # the disk budget left, see reserve_space
        self._room_measured = 0.0
        self._first_written: dict[str, int] = {}  # per topic, the first offset of this transaction
        self._dropped: dict[str, int] = {}  # messages drop-oldest trimmed, per topic, not yet logged
        self._dropped_logged = float("-inf")
        self._full_logged = Throttled(log)
        self._upkeep_logged = Throttled(log)
        self.topics: dict[str, TopicState] = storage.reload_topics()
        self._start_clock()
        self.touched: set[str] = set()
        self.deleted: list[TopicState] = []
        self._topics_stale = False  # True while `topics` may be ahead of the database
        self.space_to_give_back = True  # a previous run may have left free pages
        self._space_warned = float("-inf")
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._carry: WriteOp | None = None
        self._closed = False
        self._commit_lock = threading.Lock()  # held while a group is applied and committed
        self._finished = False  # set by close() under the commit lock: no more commits
        self._expected = 1  # writers about at the last commit: the next group waits for them
        self._commit_seconds = 0.0  # moving average of one commit's duration
        self.commits = 0  # transactions committed, and the ops/messages they carried
        self.committed_ops = 0
        self.committed_messages = 0
        self._thread = threading.Thread(target=self._run, name="smq-writer", daemon=True)
        self._thread.start()

    def policy_of(self, topic: TopicState) -> TopicPolicy:
        return topic.policy.over(self.defaults)

    def trim(self, topic: TopicState, until: int) -> int:
        """Trim inside the current transaction and remember to give the space back."""
        count = self.storage.trim(topic, until)
        if count:
            self.touched.add(topic.name)
            self.space_to_give_back = True
        return count

    def trim_step_end(self, topic: TopicState, until: int) -> int:
        """Where one step of a trim up to `until` ends (see Trim)."""
        if topic.earliest is None or until < topic.earliest:
            return until
        return min(until, self.storage.offset_freeing(topic, self.storage.trim_step))

    def retention_trim(self, topic: TopicState, until: int) -> int:
        """Trim for retention or the disk budget: like trim, but with keep_uncommitted it
        spares what a named consumer has not committed yet."""
        if self.policy_of(topic).keep_uncommitted and topic.min_committed is not None:
            until = min(until, topic.min_committed)
        return self.trim(topic, until)

    def append(self, topic: TopicState, payloads: list[bytes], size: int) -> int:
        """Append payloads (`size` bytes) to the topic within the disk budget (StorageFull
        if they do not fit). Returns the offset of the first."""
        new_mark = MARK_OVERHEAD if self.clock.now != topic.last_mark else 0
        self.reserve_space(size + ROW_OVERHEAD * len(payloads) + new_mark, topic)
        first = topic.next_offset
        self._first_written.setdefault(topic.name, first)
        self.storage.append(topic, payloads, size, self.clock.now)
        self.touched.add(topic.name)
        return first

    def reserve_space(self, size: int, topic: TopicState) -> None:
        """Raise StorageFull unless `size` more bytes fit the disk budget (the filesystem's
        free space above --min-free-space, and --max-db-size), measured at the start of
        every group once it is near and counted down within the group. While it is far
        (ROOM_TRUSTED_ABOVE), a measure is reused for ROOM_SECONDS across groups: a statfs
        and two pragmas per commit were a measurable part of a small one. At the budget,
        a drop-oldest topic makes room by trimming its own oldest messages."""
        now = time.monotonic()
        if self._room is None or (self._room >= ROOM_TRUSTED_ABOVE
                                  and now - self._room_measured >= ROOM_SECONDS):
            self._measure_room()
        if size > self._room and self.policy_of(topic).on_full == "drop-oldest":
            self._drop_oldest(topic, size)
        if size > self._room:
            raise StorageFull("disk budget reached: free space or --max-db-size exhausted; "
                              "trim or delete messages, or raise the limits")
        self._room -= size

    def _measure_room(self) -> None:
        self._room = self.storage.free_space()
        self._room_measured = time.monotonic()

    def _drop_oldest(self, topic: TopicState, size: int) -> None:
        """Trim the topic's oldest messages in this transaction until `size` bytes fit,
        measuring again after each trim (freed pages are reusable at once). Only
        messages committed before this transaction: none is dropped in the commit that
        acknowledges it. If that is not enough, every trim is undone (a savepoint), and
        the caller refuses the write having dropped nothing."""
        committed_until = self._first_written.get(topic.name, topic.next_offset) - 1
        before, dropped_before = topic.snapshot(), dict(self._dropped)
        with self.storage.savepoint() as undo:
            while size > self._room and topic.earliest is not None and topic.earliest <= committed_until:
                until = min(self.storage.offset_freeing(topic, size - self._room), committed_until)
                dropped = self.retention_trim(topic, until)
                if not dropped:
                    break  # keep_uncommitted spares the rest
                self._dropped[topic.name] = self._dropped.get(topic.name, 0) + dropped
                self._measure_room()
            if size > self._room:
                undo()
                topic.__dict__.update(before.__dict__)
                self._dropped = dropped_before
                self._measure_room()

    def _enforce_retention(self) -> None:
        """Trim the topics this group grew beyond their max_messages / max_bytes."""
        for name in list(self.touched):
            topic = self.topics.get(name)
            if topic is None or topic.earliest is None:
                continue
            policy = self.policy_of(topic)
            until = 0
            if policy.max_messages and topic.message_count > policy.max_messages:
                until = topic.next_offset - 1 - policy.max_messages
            if policy.max_bytes and topic.stored_bytes > policy.max_bytes:
                until = max(until, self.storage.offset_freeing(
                    topic, topic.stored_bytes - policy.max_bytes))
            if until:
                self.retention_trim(topic, until)

    def committed_topics(self) -> list[TopicState]:
        """Copies of the topic counters as of start-up, for the service's first view."""
        return [t.snapshot() for t in self.topics.values()]

    def submit(self, op: WriteOp) -> WriteOp:
        """Queue op for the writer thread; `op.wait()` for its result."""
        if self._closed:
            raise Unavailable("server is shutting down")
        self._queue.put(op)
        return op

    def execute(self, op: WriteOp, timeout: float | None = None) -> Any:
        """Apply op, wait until it is committed, return its result or raise its error.
        A lone writer (see the module's docstring) commits it in the calling thread."""
        if self._closed:
            raise Unavailable("server is shutting down")
        if self._expected <= 1 and self._queue.empty() and self._commit_lock.acquire(blocking=False):
            try:
                if self._finished:
                    raise Unavailable("server is shutting down")
                self._commit_group([op])
            finally:
                self._commit_lock.release()
            return op.wait(0)
        return self.submit(op).wait(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Apply what is queued, then stop the thread (and wait for a caller's own commit)."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._commit_lock.acquire(timeout=-1 if timeout is None else timeout):
            self._finished = True
            self._commit_lock.release()

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            first = self._next_first()
            if first is _STOP:
                return
            wait = 0.0 if first is None else first.not_before - time.monotonic()
            if wait > 0:  # a busy stream's next chunk: let it fill (StreamAppend)
                time.sleep(min(wait, STREAM_SECONDS))
            with self._commit_lock:
                if first is not None:
                    # Gathered under the lock: what arrives while a caller commits its
                    # own op joins this group rather than the next.
                    self._commit_group(self._gather(first))
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + TICK_SECONDS

    def _tick(self) -> None:
        """Periodic upkeep: age retention (and saving message time's offset after a step
        of the wall clock), then giving free pages back to the disk."""
        self._read_clock()
        if self._clock_unsaved or any(self.policy_of(t).max_age for t in self.topics.values()):
            self._commit_group([EnforceAge()])
        self._give_space_back()

    def _start_clock(self) -> None:
        """Message time goes on from what the database kept (clock.py); saved by the first
        transaction, so that starting never writes (a full disk must not stop it)."""
        newest = max((t.last_mark for t in self.topics.values() if t.last_mark), default=None)
        for note in self.clock.start(self.storage.clock_state(), newest):
            log.warning("%s", note)
        self._clock_unsaved = True

    def _read_clock(self) -> None:
        """Fix message time for the next transaction; a step of the wall clock is logged
        once and its offset saved by the next transaction."""
        step = self.clock.tick()
        if step:
            log.warning("the wall clock stepped %s: message time goes on without the step, so age "
                        "retention counts each message's age from when it was written",
                        describe_shift(step))
            self._clock_unsaved = True

    def _next_first(self) -> Any:
        """The op that starts the next group; None after an idle tick; _STOP to stop."""
        if self._carry is not None:
            first, self._carry = self._carry, None
            return first
        try:
            return self._queue.get(timeout=TICK_SECONDS)
        except queue.Empty:
            return None

    def _gather(self, first: WriteOp) -> list[WriteOp]:
        """`first` plus what is queued behind it, within the caps; when fewer ops than
        were about at the last commit are there, wait a little for the rest (module
        docstring)."""
        group = [first]
        messages, size = first.messages, first.bytes
        deadline = None
        while messages < MAX_GROUP_MESSAGES and size < MAX_GROUP_BYTES:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                if len(group) >= self._expected:
                    break
                if deadline is None:
                    wait = GATHER_COMMITS * self._commit_seconds
                    deadline = time.monotonic() + min(max(wait, GATHER_MIN_SECONDS),
                                                      GATHER_MAX_SECONDS)
                try:
                    op = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
            if op is _STOP:
                self._queue.put(_STOP)  # finish this group, then stop
                break
            if messages + op.messages > MAX_GROUP_MESSAGES or size + op.bytes > MAX_GROUP_BYTES:
                self._carry = op
                break
            group.append(op)
            messages += op.messages
            size += op.bytes
        return group

    def _commit_group(self, group: list[WriteOp]) -> None:
        """Apply and commit group (under the commit lock), then release its callers; ops
        left unfinished go on in transactions of their own."""
        while group:
            group = self._commit_once(group)

    def _commit_once(self, group: list[WriteOp]) -> list[WriteOp]:
        """Apply and commit group; release the callers of its finished ops and return
        the unfinished ones."""
        started = time.monotonic()
        unfinished: list[WriteOp] = []
        try:
            self._apply_in_one_transaction(group)
            self._commit_seconds += 0.25 * (time.monotonic() - started - self._commit_seconds)
            # The writers about: this group's, and those that queued up meanwhile.
            self._expected = len(group) + self._queue.qsize()
            unfinished = [op for op in group if op.unfinished and op.error is None]
        except SMQError as exc:
            self._forget_uncommitted()
            if len(group) > 1:
                log.warning("group of %d writes failed (%s); retrying one by one", len(group), exc)
                for op in group:
                    self._commit_group([op])
                return []
            group[0].result, group[0].error = None, exc
            if isinstance(exc, StorageFull):  # a client writing into a full disk: once a minute
                self._full_logged.log(logging.WARNING, "write refused: %s", exc)
            else:
                log.error("write failed: %s", exc)
        except Exception as exc:  # a bug: fail the callers rather than hang them
            log.exception("unexpected error in the writer")
            self._forget_uncommitted()
            for op in group:
                op.result, op.error = None, StorageFailure(f"unexpected writer error: {exc}")
        self._publish()
        for op in group:
            if op in unfinished:
                op.unfinished = False
            else:
                op._finish()
        return unfinished

    def _apply_in_one_transaction(self, group: list[WriteOp]) -> None:
        if self._room is not None and self._room < ROOM_TRUSTED_ABOVE:
            self._room = None
        if self._topics_stale:
            self.topics = self.storage.reload_topics()
            self._topics_stale = False
        self._first_written.clear()
        dropped_before = dict(self._dropped)
        try:
            with self.storage.write_transaction():
                self._read_clock()
                clock_saved = self._clock_unsaved
                if clock_saved:
                    self.storage.save_clock_state(self.clock.state())
                for op in group:
                    op.error = None
                    op.apply(self)
                self._enforce_retention()
                self.storage.save_counters(self.topics[n] for n in self.touched if n in self.topics)
        except BaseException:
            self._dropped = dropped_before  # rolled back: nothing was dropped
            raise
        self._report_dropped()
        self._limit_wal()
        if clock_saved:
            self._clock_unsaved = False
        self.commits += 1
        self.committed_ops += len(group)
        self.committed_messages += sum(op.messages for op in group)

    def _limit_wal(self) -> None:
        """After a commit (which stands, whatever happens here): keep the WAL to its share."""
        try:
            self.storage.limit_wal()
        except SMQError as exc:
            self._upkeep_logged.log(logging.WARNING, "could not checkpoint the WAL: %s", exc)

    def _report_dropped(self) -> None:
        """Log what drop-oldest dropped, at most once a minute (at a full budget, it
        drops at every write)."""
        now = time.monotonic()
        if self._dropped and now - self._dropped_logged >= DROPPED_LOG_SECONDS:
            log.warning("disk budget reached: dropped the oldest messages of drop-oldest topics "
                        "to make room (%s; logged at most every %ds)",
                        ", ".join(f"{n} of {t!r}" for t, n in sorted(self._dropped.items())),
                        DROPPED_LOG_SECONDS)
            self._dropped.clear()
            self._dropped_logged = now

    def _forget_uncommitted(self) -> None:
        """After a rollback: the database is the truth again. Every topic is published
        anew, since what was committed before the failure must not be lost from view.
        Never raises: if the database cannot be read either, the next group reloads the
        counters first (or fails)."""
        self.deleted.clear()
        self._topics_stale = True
        try:
            self.topics = self.storage.reload_topics()
            self._topics_stale = False
            self.touched = set(self.topics)
        except SMQError as exc:
            self.touched.clear()
            log.error("cannot reload topic counters after a failed write: %s", exc)

    def _publish(self) -> None:
        if self.touched or self.deleted:
            changed = [self.topics[n].snapshot() for n in self.touched if n in self.topics]
            changed += [t.snapshot() for t in self.deleted if t.name not in self.topics]
            self.touched.clear()
            self.deleted.clear()
            self._on_commit(changed)

    def _give_space_back(self) -> None:
        if not self.space_to_give_back:
            return
        try:
            self.space_to_give_back = self.storage.give_back_space() > 0
        except SMQError as exc:
            # Retried every tick; on a full disk that would log every second.
            now = time.monotonic()
            if now - self._space_warned >= SPACE_WARNING_SECONDS:
                self._space_warned = now
                log.warning("could not give free space back (retrying every %gs, logged at most "
                            "every %ds): %s", TICK_SECONDS, SPACE_WARNING_SECONDS, exc)
