"""The writer thread's queue: small writes go before large ones, in turns.

A large write holds the writer for long: a 4 MB ProduceBatch takes 40-60 ms to commit
here (storage format 4 keeps 512-byte pages, so its overflow chain is 8,000 pages). In
one arrival-ordered queue, a 200-byte Produce waited for the large write being
committed and for the ones queued before it. So ops leave the queue into two lanes by
size (more than SMALL_WRITE bytes is large, as write_queue.py counts it), and each
group holds ops of one lane only. While both lanes hold ops they take turns: a small op
waits for at most one large group, a large op for at most one small group.

Writes of one connection stay in arrival order: a small op whose connection (`source`)
has a large op waiting goes behind it, into the large lane. A caller waits for each
write's commit before it sends the next (a unary call, a StreamProduce stream, a
Producer's lane) except when it gave up on one (its deadline passed, it cancelled):
that write may still be committed, and must not be overtaken by the caller's next one
(a write whose caller gave up before it got here is not written: writer.py).
Ops of different connections come from callers that did not wait for one another.

A StreamAppend goes on taking messages while it waits; it is sealed when it joins a
group, and one that grew large while it waited in the small lane moves to the large
one instead.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import time
from typing import Any

from .ops import WriteOp
from .write_queue import SMALL_WRITE

MAX_GROUP_MESSAGES = 20_000
MAX_GROUP_BYTES = 32 * 1024**2  # a group of small writes
# A group of large writes: what a small write may have to wait for. One op always goes,
# however large (a ProduceBatch is one transaction).
LARGE_GROUP_BYTES = 1024**2

STOP: Any = object()  # put by the writer's close(): commit what is queued, then stop


class WriteLanes:
    """Filled by any thread (`put`); emptied by the writer thread only."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._small: collections.deque[WriteOp] = collections.deque()
        self._large: collections.deque[WriteOp] = collections.deque()
        self._large_turn = False  # the last group was small while large ops waited
        self._large_from: collections.Counter[object] = collections.Counter()  # by source
        self.stopping = False  # STOP was taken: no op comes after what is queued

    def put(self, op: Any) -> None:
        self._queue.put(op)

    def empty(self) -> bool:
        return self._queue.empty() and not self._small and not self._large

    def small_waiting(self) -> int:
        """Small ops (and unsorted ones) waiting: callers that would join a small group."""
        return self._queue.qsize() + len(self._small)

    def depth(self) -> int:
        """Every op waiting, small and large (read from any thread: a moment's view)."""
        return self._queue.qsize() + len(self._small) + len(self._large)

    def wait_for_work(self, timeout: float) -> bool:
        """Block until an op waits (True), or `timeout` passed or STOP came (False)."""
        if not self._small and not self._large and not self.stopping:
            with contextlib.suppress(queue.Empty):
                self._sort(self._queue.get(timeout=timeout))
        return bool(self._small or self._large)

    def leader(self) -> WriteOp:
        """The op the next group starts with (wait_for_work returned True)."""
        return self._large[0] if self._large_goes_next() else self._small[0]

    def next_group(self, expected: int, wait_seconds: float) -> list[WriteOp]:
        """Ops for one transaction, all small or all large, at least one. A small group
        that has fewer ops than the `expected` writers waits up to `wait_seconds` for the
        rest (writer.py's docstring)."""
        self._drain()
        if self._large_goes_next():
            self._large_turn = False
            return self._take(self._large, _Group(LARGE_GROUP_BYTES))
        group = self._take(self._small, _Group(MAX_GROUP_BYTES))
        deadline = time.monotonic() + wait_seconds
        while 0 < len(group) < expected and not self.stopping and group.has_room():
            try:
                self._sort(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
            self._take(self._small, group)
        if not group:  # every small op had grown large
            return self._take(self._large, _Group(LARGE_GROUP_BYTES))
        self._large_turn = bool(self._large)
        return group

    def _large_goes_next(self) -> bool:
        return bool(self._large) and (self._large_turn or not self._small)

    def _take(self, lane: collections.deque[WriteOp], group: _Group) -> _Group:
        """Move ops from the head of `lane` into `group` while they fit (the first always)."""
        while lane and (not group or group.fits(lane[0])):
            op = lane.popleft()
            op.seal()
            if lane is self._small and op.bytes > SMALL_WRITE:
                self._to_large(op, front=True)  # a stream's op that grew while it waited
                continue
            if lane is self._large:
                self._forget_large(op)
            group.add(op)
        return group

    def _drain(self) -> None:
        while True:
            try:
                self._sort(self._queue.get_nowait())
            except queue.Empty:
                return

    def _sort(self, op: Any) -> None:
        if op is STOP:
            self.stopping = True
        elif op.bytes > SMALL_WRITE or self._large_from[op.source]:
            self._to_large(op)
        else:
            self._small.append(op)

    def _to_large(self, op: WriteOp, front: bool = False) -> None:
        if front:
            self._large.appendleft(op)
        else:
            self._large.append(op)
        if op.source is not None:
            self._large_from[op.source] += 1

    def _forget_large(self, op: WriteOp) -> None:
        if op.source is not None:
            self._large_from[op.source] -= 1
            if not self._large_from[op.source]:
                del self._large_from[op.source]


class _Group(list[WriteOp]):
    """The ops of one transaction, with their total messages and bytes."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0

    def add(self, op: WriteOp) -> None:
        self.append(op)
        self.messages += op.messages
        self.bytes += op.bytes

    def fits(self, op: WriteOp) -> bool:
        return (
            self.messages + op.messages <= MAX_GROUP_MESSAGES
            and self.bytes + op.bytes <= self.max_bytes
        )

    def has_room(self) -> bool:
        return self.messages < MAX_GROUP_MESSAGES and self.bytes < self.max_bytes
