"""Group commit: one thread applies every write, many writes per transaction.

Callers (gRPC threads) submit WriteOps and wait. The writer thread takes the op at
the head of the queue plus everything queued behind it (up to a size cap), applies
them all in one transaction, commits once (one fsync in full durability), and only
then releases every caller. While one commit is being fsynced, new ops pile up and
form the next group: the more concurrent writers, the more each commit carries.

If a group fails in storage (disk full, I/O error), nothing of it was committed;
its ops are retried one per transaction so that one bad op cannot fail the others.

The writer owns the working topic counters (next offset, earliest, bytes). After each
commit it hands copies of the topics it changed to `on_commit`, which is how the
rest of the server learns what readers may now see.
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import SMQError, StorageFailure, TopicNotFound, Unavailable
from .storage import Storage, TopicState

log = logging.getLogger(__name__)

MAX_GROUP_MESSAGES = 20_000
MAX_GROUP_BYTES = 32 * 1024**2
IDLE_VACUUM_SECONDS = 1.0


class WriteOp:
    """One unit of work for the writer. `apply` runs inside the group's transaction
    and sets `result` or `error`; the caller's `wait()` returns once it is committed."""

    messages = 0
    bytes = 0

    def __init__(self) -> None:
        self.result: Any = None
        self.error: SMQError | None = None
        self._done = threading.Event()

    def apply(self, writer: GroupCommitWriter) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until committed; return the result or raise the op's error."""
        if not self._done.wait(timeout):
            raise Unavailable("the storage writer did not answer in time")
        if self.error is not None:
            raise self.error
        return self.result

    def _finish(self) -> None:
        self._done.set()


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
    """

    def __init__(self, items: Sequence[tuple[str, bytes]], atomic: bool = False) -> None:
        super().__init__()
        self.items = items
        self.atomic = atomic
        self.messages = len(items)
        self.bytes = sum(len(payload) for _, payload in items)

    def apply(self, writer: GroupCommitWriter) -> None:
        if self.atomic:
            missing = next((t for t, _ in self.items if t not in writer.topics), None)
            if missing is not None:
                self.error = TopicNotFound(missing)
                return
        first = last = 0
        start = 0
        while start < len(self.items):
            name = self.items[start][0]
            end = start
            while end < len(self.items) and self.items[end][0] == name:
                end += 1
            topic = writer.topics.get(name)
            if topic is None:
                self.error = TopicNotFound(name)
                break
            offset = topic.next_offset
            writer.storage.append(topic, [payload for _, payload in self.items[start:end]])
            writer.touched.add(name)
            first = first or offset
            last = topic.next_offset - 1
            start = end
        self.result = (first, last)


class Trim(WriteOp):
    """Delete messages with offset <= until. Result: how many were deleted."""

    def __init__(self, name: str, until: int) -> None:
        super().__init__()
        self.name = name
        self.until = until

    def apply(self, writer: GroupCommitWriter) -> None:
        topic = writer.topics.get(self.name)
        if topic is None:
            self.error = TopicNotFound(self.name)
            return
        self.result = writer.storage.trim(topic, self.until)
        if self.result:
            writer.touched.add(self.name)
            writer.space_to_give_back = True


class Barrier(WriteOp):
    """Does nothing; answers once the writer has reached it (a liveness probe)."""

    def apply(self, writer: GroupCommitWriter) -> None:
        self.result = True


_STOP = object()


class GroupCommitWriter:
    """The single writer thread. Submit ops with `submit`; `close` drains and stops."""

    def __init__(self, storage: Storage,
                 on_commit: Callable[[list[TopicState]], None] = lambda topics: None) -> None:
        self.storage = storage
        self.topics: dict[str, TopicState] = storage.reload_topics()
        self.touched: set[str] = set()
        self._topics_stale = False  # True while `topics` may be ahead of the database
        self.space_to_give_back = True  # a previous run may have left free pages
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._carry: WriteOp | None = None
        self._closed = False
        self.commits = 0  # transactions committed, and the ops/messages they carried
        self.committed_ops = 0
        self.committed_messages = 0
        self._thread = threading.Thread(target=self._run, name="smq-writer", daemon=True)
        self._thread.start()

    def committed_topics(self) -> list[TopicState]:
        """Copies of the topic counters as of start-up, for the service's first view."""
        return [copy.copy(t) for t in self.topics.values()]

    def submit(self, op: WriteOp) -> WriteOp:
        if self._closed:
            raise Unavailable("server is shutting down")
        self._queue.put(op)
        return op

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Apply what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            if group:
                self._commit_group(group)

    def _next_group(self) -> list[WriteOp] | None:
        """The op at the head plus what is queued behind it, within the caps.
        [] after an idle second (after doing idle work); None once stopped."""
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            try:
                first = self._queue.get(timeout=IDLE_VACUUM_SECONDS)
            except queue.Empty:
                self._idle_work()
                return []
        if first is _STOP:
            return None
        group = [first]
        messages, size = first.messages, first.bytes
        while messages < MAX_GROUP_MESSAGES and size < MAX_GROUP_BYTES:
            try:
                op = self._queue.get_nowait()
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
        try:
            self._apply_in_one_transaction(group)
        except SMQError as exc:
            self._forget_uncommitted()
            if len(group) == 1:
                group[0].result, group[0].error = None, exc
                log.error("write failed: %s", exc)
            else:
                log.warning("group of %d writes failed (%s); retrying one by one", len(group), exc)
                for op in group:
                    self._commit_group([op])
                return
        except Exception as exc:  # a bug: fail the callers rather than hang them
            log.exception("unexpected error in the writer")
            self._forget_uncommitted()
            for op in group:
                op.result, op.error = None, StorageFailure(f"unexpected writer error: {exc}")
        self._publish()
        for op in group:
            op._finish()

    def _forget_uncommitted(self) -> None:
        """After a rollback: drop counters the failed ops advanced. Never raises: if the
        database cannot be read either, the next group reloads them first (or fails)."""
        self.touched.clear()
        self._topics_stale = True
        try:
            self.topics = self.storage.reload_topics()
            self._topics_stale = False
        except SMQError as exc:
            log.error("cannot reload topic counters after a failed write: %s", exc)

    def _apply_in_one_transaction(self, group: list[WriteOp]) -> None:
        if self._topics_stale:
            self.topics = self.storage.reload_topics()
            self._topics_stale = False
        with self.storage.write_transaction():
            for op in group:
                op.error = None
                op.apply(self)
        self.commits += 1
        self.committed_ops += len(group)
        self.committed_messages += sum(op.messages for op in group)

    def _publish(self) -> None:
        if self.touched:
            changed = [copy.copy(self.topics[n]) for n in self.touched if n in self.topics]
            self.touched.clear()
            self._on_commit(changed)
        if self.space_to_give_back and self._queue.empty():
            self._idle_work()

    def _idle_work(self) -> None:
        if not self.space_to_give_back:
            return
        try:
            self.space_to_give_back = self.storage.give_back_space() > 0
        except SMQError as exc:
            log.warning("could not give free space back: %s", exc)
