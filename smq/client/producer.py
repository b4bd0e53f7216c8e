"""`Producer`: threads send one message at a time, the server gets them in batches.

    from smq.client import Client, Producer

    with Client("localhost", 8097) as client, Producer(client) as producer:
        sent = producer.send("sensors", b'{"t": 21.5}')   # returns at once
        offset = sent.result()                            # once its batch is committed

One message per call is where gRPC from Python is slowest; a ProduceBatch of many costs
little more than one. A Producer gathers what `send` is given into batches and sends
them (ProduceBatch) from its own threads, several at once.

- Order: messages one thread sends to one topic get increasing offsets, in send order.
  Each (topic, thread) is a lane whose batches go one after the other; different lanes
  go in parallel, up to `max_in_flight` requests.
- Batches: a lane's batch leaves when a sender thread is free and the batch is `linger`
  seconds old (default 0: at once), or sooner once full (`batch_size` messages or
  `max_batch_bytes`). While every sender is busy, messages gather: batches grow with load.
- Results: `send` returns a `SentMessage`, a light future (`result`, `exception`,
  `done`, `add_done_callback`) that resolves to the message's offset once its batch is
  committed with the server's durability, or raises that batch's `SMQError`. A batch is
  all or nothing (ProduceBatch is atomic), and is never retried: after an error the
  messages may still have been stored if the reply was what got lost (as with `produce`).
- Memory: at most `max_pending` messages and `max_pending_bytes` bytes wait or fly;
  `send` blocks while they would not fit, up to its `timeout`, then raises SMQTimeoutError.

Synchronisation is per batch, not per message: a send takes one lock for a list append;
a batch has the one Event its messages' futures wait on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import SMQProduceError, SMQTimeoutError
from . import rpcs
from .types import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_SIZE,
    Payload,
    as_bytes,
    batch_full,
    message_cost,
)

__all__ = ["Producer", "SentMessage"]

DEFAULT_LINGER = 0.0  # seconds a batch may wait for more messages once a sender is free
DEFAULT_MAX_IN_FLIGHT = 4  # ProduceBatch requests at once (the Producer's threads)
DEFAULT_MAX_PENDING = 100_000  # messages waiting or in flight
DEFAULT_MAX_PENDING_BYTES = 64 * 1024**2  # their payload bytes

Lane = tuple[str, int]  # (topic, sending thread's ident)


class _Batch:
    """Messages of one lane that go in one ProduceBatch; done once it is answered."""

    __slots__ = (
        "born",
        "callbacks",
        "done",
        "error",
        "first_offset",
        "lane",
        "payloads",
        "size",
        "urgent",
    )

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.payloads: list[bytes] = []
        self.size = 0
        self.born = time.monotonic()
        self.urgent = False  # flush() or close() asked for it: linger no longer applies
        self.done = threading.Event()
        self.first_offset = 0
        self.error: BaseException | None = None
        self.callbacks: list[tuple[Callable[[SentMessage], Any], SentMessage]] | None = None

    def finish(self, first_offset: int, error: BaseException | None, lock: threading.Lock) -> None:
        self.first_offset, self.error = first_offset, error
        with lock:  # add_done_callback checks `done` under the same lock
            self.done.set()
            callbacks, self.callbacks = self.callbacks, None
        for callback, message in callbacks or ():
            _run_callback(callback, message)


class SentMessage:
    """A message given to `Producer.send`: its offset once its batch is committed.
    The parts of `concurrent.futures.Future` a caller uses, without its per-message cost."""

    __slots__ = ("_batch", "_index", "_lock")

    def __init__(self, batch: _Batch, index: int, lock: threading.Lock) -> None:
        self._batch, self._index, self._lock = batch, index, lock

    def done(self) -> bool:
        return self._batch.done.is_set()

    def result(self, timeout: float | None = None) -> int:
        """The message's offset, waiting up to `timeout` seconds (None: for ever).
        Raises the batch's SMQError, or SMQTimeoutError (a TimeoutError) if not done."""
        error = self.exception(timeout)
        if error is not None:
            raise error
        return self._batch.first_offset + self._index

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The batch's error, or None once committed; SMQTimeoutError if not done in time."""
        if not self._batch.done.wait(timeout):
            raise _NotDoneYet(f"the message was not committed within {timeout} s (it may still be)")
        return self._batch.error

    def add_done_callback(self, callback: Callable[[SentMessage], Any]) -> None:
        """Call `callback(self)` once done (at once if it is), from the Producer's thread."""
        with self._lock:
            if not self._batch.done.is_set():
                if self._batch.callbacks is None:
                    self._batch.callbacks = []
                self._batch.callbacks.append((callback, self))
                return
        _run_callback(callback, self)

    def __repr__(self) -> str:
        if not self.done():
            return "<SentMessage pending>"
        if self._batch.error is not None:
            return f"<SentMessage failed: {type(self._batch.error).__name__}>"
        return f"<SentMessage offset={self.result()}>"


class _NotDoneYet(SMQTimeoutError, TimeoutError):
    """A wait on a SentMessage (or flush) ended before the batch was answered."""

    code = "DEADLINE_EXCEEDED"


def _run_callback(callback: Callable[[SentMessage], Any], message: SentMessage) -> None:
    try:
        callback(message)
    except Exception:  # as concurrent.futures does: a callback's error is logged, not raised
        import logging

        logging.getLogger("smq.client").exception("a SentMessage callback raised")


class Producer:
    """Sends messages in batches from its own threads; `send` is thread-safe.

    `Producer(client, *, linger=0.0, batch_size=1000, max_batch_bytes=3 MiB,
    max_in_flight=4, max_pending=100_000, max_pending_bytes=64 MiB, timeout=)`:
    `timeout` is each batch request's (the client's default unless given).
    `flush()` waits for what was sent before it; `close()` flushes and stops the threads
    (the client stays open: it is the caller's); `with Producer(...)` closes at the end.
    """

    def __init__(
        self,
        client: Any,
        *,
        linger: float = DEFAULT_LINGER,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        timeout: float | None = None,
    ) -> None:
        if linger < 0:
            raise ValueError(f"linger must be 0 or more seconds, not {linger}")
        for name, value in (
            ("batch_size", batch_size),
            ("max_batch_bytes", max_batch_bytes),
            ("max_in_flight", max_in_flight),
            ("max_pending", max_pending),
            ("max_pending_bytes", max_pending_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self._client = client
        self._linger, self._batch_size, self._max_batch_bytes = linger, batch_size, max_batch_bytes
        self._max_pending, self._max_pending_bytes = max_pending, max_pending_bytes
        self._timeout = client.timeout if timeout is None else timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # sender threads wait for a batch
        self._room = threading.Condition(self._lock)  # send() waits for room
        self._lanes: dict[Lane, deque[_Batch]] = {}  # batches not yet taken, oldest first
        self._busy: set[Lane] = set()  # lanes with a batch in flight
        self._flying: set[_Batch] = set()
        self._pending = self._pending_bytes = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._send_batches, name=f"smq-producer-{n}", daemon=True)
            for n in range(max_in_flight)
        ]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the callers' side ---------------------------------------------------------------

    def send(self, topic: str, payload: Payload, *, timeout: float | None = None) -> SentMessage:
        """Queue one message (bytes, or str as UTF-8) for `topic`; returns its SentMessage.
        Blocks while `max_pending` messages (or bytes) wait, up to `timeout` seconds
        (None: for ever), then raises SMQTimeoutError. RuntimeError once closed."""
        data = as_bytes(payload)
        cost = message_cost(data)
        lane = (topic, threading.get_ident())
        with self._lock:
            if self._closing:
                raise RuntimeError("this Producer is closed; create a new one")
            if (
                self._pending >= self._max_pending
                or self._pending_bytes + cost > self._max_pending_bytes
            ):
                self._wait_for_room(cost, timeout)
            queue = self._lanes.get(lane)
            if queue is None:
                queue = self._lanes[lane] = deque()
            batch = queue[-1] if queue else None
            if batch is None or batch_full(
                len(batch.payloads), batch.size, cost, self._batch_size, self._max_batch_bytes
            ):
                batch = _Batch(lane)
                queue.append(batch)
                if lane not in self._busy:
                    self._work.notify()
            index = len(batch.payloads)
            batch.payloads.append(data)
            batch.size += cost
            self._pending += 1
            self._pending_bytes += cost
        return SentMessage(batch, index, self._lock)

    def _wait_for_room(self, cost: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # A message larger than max_pending_bytes waits for an empty producer, then goes.
        while self._pending >= self._max_pending or (
            self._pending and self._pending_bytes + cost > self._max_pending_bytes
        ):
            for queue in self._lanes.values():  # what waits should leave now, linger or not
                for batch in queue:
                    batch.urgent = True
            self._work.notify_all()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SMQTimeoutError(
                    f"could not queue a message: {self._pending} messages "
                    f"({self._pending_bytes} bytes) still wait after {timeout} s; "
                    "the server is slow or unreachable"
                )
            self._room.wait(remaining)
            if self._closing:
                raise RuntimeError("this Producer is closed; create a new one")

    def flush(self, timeout: float | None = None) -> None:
        """Send what waits now and wait until every message sent before this call is
        answered (committed or failed: see each SentMessage). SMQTimeoutError after
        `timeout` seconds (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            batches = [batch for queue in self._lanes.values() for batch in queue]
            for batch in batches:
                batch.urgent = True
            batches += self._flying
            self._work.notify_all()
        for batch in batches:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not batch.done.wait(remaining):
                raise _NotDoneYet(f"flush did not finish within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the Producer's threads. Later sends raise RuntimeError."""
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closing = True
                self._work.notify_all()
                self._room.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # -- the Producer's threads ------------------------------------------------------------

    def _send_batches(self) -> None:
        while True:
            with self._lock:
                batch = self._take_batch()
                if batch is None:
                    return
            first, error = self._produce(batch)
            with self._lock:
                self._busy.discard(batch.lane)
                self._flying.discard(batch)
                self._pending -= len(batch.payloads)
                self._pending_bytes -= batch.size
                self._room.notify_all()
                if self._lanes.get(batch.lane):
                    self._work.notify()  # the lane's next batch may go now
            batch.finish(first, error, self._lock)

    def _take_batch(self) -> _Batch | None:
        """The next batch to send (its lane then busy), waiting for one; None once closing
        with nothing left. Called with the lock held."""
        while True:
            now = time.monotonic()
            wake_at = None
            for lane, queue in self._lanes.items():
                if lane in self._busy or not queue:
                    continue
                batch = queue[0]
                ready_at = batch.born + self._linger
                if (
                    now >= ready_at
                    or batch.urgent
                    or self._closing
                    or len(queue) > 1
                    or len(batch.payloads) >= self._batch_size
                ):
                    queue.popleft()
                    if not queue:
                        del self._lanes[lane]
                    self._busy.add(lane)
                    self._flying.add(batch)
                    return batch
                wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
            if self._closing and not self._lanes:
                return None
            self._work.wait(None if wake_at is None else max(0.0, wake_at - now))

    def _produce(self, batch: _Batch) -> tuple[int, BaseException | None]:
        try:
            offsets = self._client._run(
                rpcs.produce_batch(batch.lane[0], batch.payloads), self._timeout
            )
        except Exception as exc:  # an SMQError, or a closed client: the futures must not hang
            return 0, exc
        if len(offsets) != len(batch.payloads):
            return 0, SMQProduceError(
                f"the server answered {len(offsets)} offsets for a batch of "
                f"{len(batch.payloads)} messages to {batch.lane[0]!r}"
            )
        return offsets.start, None
