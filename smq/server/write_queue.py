"""A bound on the large writes queued for the writer thread at once.

There is one writer (SQLite has one) and it commits in arrival order, so a small write
waits for every write queued before it: behind the 4 MB batches and 1 MiB stream
messages that the memory budget lets in at once, a 200-byte Produce waited up to a
second and more. Large writes therefore take room here before they go to the writer:
a ProduceBatch or Produce of more than SMALL_WRITE bytes for as long as its call waits
for the commit (`room`), a StreamProduce write of such messages until the writer has
committed it (`room_until_done`). Small writes never wait for room.

A large unary write that finds no room waits up to `wait_seconds` for it; at most
`max_waiting` wait at once (each holds one of the threads unary calls share), others
are refused at once: Overloaded (RESOURCE_EXHAUSTED). A stream's write waits longer
(`stream_wait_seconds`) and need not wait its turn to wait: each stream has a thread
of its own, and what it holds meanwhile is counted in the memory budget. A write
larger than `limit` still goes, alone.

Called by the threads that run calls (QueueService's produce methods).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol

from ..errors import Overloaded

SMALL_WRITE = 64 * 1024
WRITE_QUEUE_BYTES = 4 * 1024**2
WAIT_SECONDS = 2.0
STREAM_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.005  # how often a waiter looks whether a stream's write is done


class Done(Protocol):
    def done(self) -> bool: ...


class WriteQueue:
    def __init__(
        self,
        limit: int = WRITE_QUEUE_BYTES,
        max_waiting: int = 4,
        wait_seconds: float = WAIT_SECONDS,
        stream_wait_seconds: float = STREAM_WAIT_SECONDS,
    ) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait_seconds = wait_seconds
        self.stream_wait_seconds = stream_wait_seconds
        self._changed = threading.Condition()
        self._held = 0  # room held by calls until they return it
        self._until_done: list[tuple[Done, int]] = []  # room held until a write is done
        self._waiting = 0

    @property
    def queued(self) -> int:
        with self._changed:
            return self._queued()

    @contextlib.contextmanager
    def room(self, size: int) -> Iterator[None]:
        """Hold room for a write of `size` bytes until the block ends (its commit)."""
        if size <= SMALL_WRITE:
            yield
            return
        self._take(size, None)
        try:
            yield
        finally:
            with self._changed:
                self._held -= size
                self._changed.notify_all()

    def room_until_done(self, write: Done, size: int, large: bool) -> None:
        """Take room for `write` of up to `size` bytes, held until `write.done()`; only
        for a `large` one (made of messages larger than SMALL_WRITE)."""
        if large:
            self._take(size, write)

    def _take(self, size: int, write: Done | None) -> None:
        """Wait for room (see the module's docstring), then hold it: until it is given
        back (`write` None: a unary write) or until `write` is done (a stream's)."""
        with self._changed:
            if write is None:
                self._wait_for(size, self.wait_seconds, counted=True)
                self._held += size
            else:
                self._wait_for(size, self.stream_wait_seconds, counted=False)
                self._until_done.append((write, size))

    def _wait_for(self, size: int, seconds: float, counted: bool) -> None:
        """Return once `size` fits; raise Overloaded if it does not within `seconds`, or
        at once if it is `counted` among the unary writers waiting and max_waiting wait
        already. Called with the lock held."""
        if self._fits(size):
            return
        if counted and self._waiting >= self.max_waiting:
            raise Overloaded(self._refusal())
        self._waiting += counted
        try:
            deadline = time.monotonic() + seconds
            while not self._fits(size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(self._refusal())
                # Woken when a call gives its room back; a stream's write being done
                # tells nobody, so look again soon.
                self._changed.wait(min(remaining, POLL_SECONDS if self._until_done else 1.0))
        finally:
            self._waiting -= counted

    def _queued(self) -> int:
        self._until_done = [(write, size) for write, size in self._until_done if not write.done()]
        return self._held + sum(size for _, size in self._until_done)

    def _fits(self, size: int) -> bool:
        queued = self._queued()
        return queued == 0 or queued + size <= self.limit

    def _refusal(self) -> str:
        return (
            f"too many large writes queued ({self._queued() / 1024**2:.1f} MiB waiting for "
            "the disk, more waiting for room): retry later"
        )
