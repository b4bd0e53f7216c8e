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
- Memory: at most `max_pending` messages wait or fly, and `max_pending_bytes` of them
  (plus the batch each sending thread is filling, at most `max_batch_bytes`); `send`
  blocks while one more would not fit, up to its `timeout`, then raises SMQTimeoutError.

Synchronisation is per batch, not per message. A lane is its sending thread's own: a
send takes only that lane's lock (which a sender thread needs only to take a batch), so
sending threads never wait for each other; a lock shared by 8 sending threads cost about
6 us per message here, ten times the message's own work. The shared lock and the
counters it guards change once per batch; a message's place in the queue is a ticket
from an atomic counter. A batch has the one Event its messages' futures wait on.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import SMQProduceError, SMQTimeoutError
from . import rpcs
from .types import (
    DEFAULT_BATCH_BYTES,
    Payload,
    as_bytes,
    batch_full,
    message_cost,
)

__all__ = ["Producer", "SentMessage"]

log = logging.getLogger("smq.client")

DEFAULT_LINGER = 0.0  # seconds a batch may wait for more messages once a sender is free
DEFAULT_MAX_IN_FLIGHT = 4  # ProduceBatch requests at once (the Producer's threads)
# Messages per batch at most. Larger than produce_many's 1000: the Producer's threads wait
# for the GIL behind the sending threads once per request, so fewer, larger requests
# (compare with bench/clients.py and `Producer(client, batch_size=1000)`).
DEFAULT_PRODUCER_BATCH = 5000
DEFAULT_MAX_PENDING = 100_000  # messages waiting or in flight
DEFAULT_MAX_PENDING_BYTES = 64 * 1024**2  # their payload bytes


def check_settings(linger: float, **limits: int) -> None:
    """A Producer's (or AsyncProducer's) settings: ValueError naming the first bad one."""
    if linger < 0:
        raise ValueError(f"linger must be 0 or more seconds, not {linger}")
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")


class _Lane:
    """One sending thread's messages to one topic: the batch it is filling, then the
    full ones waiting, oldest first. `lock` guards both; `busy` (a batch in flight) and
    the lanes' list belong to the Producer's lock."""

    __slots__ = ("busy", "filling", "full", "lock", "owner", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.owner = threading.current_thread()
        self.lock = threading.Lock()
        self.filling: _Batch | None = None
        self.full: deque[_Batch] = deque()
        self.busy = False

    def idle(self) -> bool:
        return not self.busy and self.filling is None and not self.full


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

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane
        self.payloads: list[bytes] = []
        self.size = 0
        self.born = time.monotonic()
        self.urgent = False  # flush(), close() or a waiting send: linger no longer applies
        self.done = threading.Event()
        self.first_offset = 0
        self.error: BaseException | None = None
        self.callbacks: list[tuple[Callable[[SentMessage], Any], SentMessage]] | None = None

    def resolve(
        self, first_offset: int, error: BaseException | None
    ) -> list[tuple[Callable[[SentMessage], Any], SentMessage]]:
        """Record the answer and mark the batch done; the callbacks to run now."""
        self.first_offset, self.error = first_offset, error
        with self.lane.lock:  # add_done_callback checks `done` under the same lock
            self.done.set()
            callbacks, self.callbacks = self.callbacks, None
        return callbacks or []

    def finish(self, first_offset: int, error: BaseException | None) -> None:
        for callback, message in self.resolve(first_offset, error):
            _run_callback(callback, message)


class SentMessage:
    """A message given to `Producer.send`: its offset once its batch is committed.
    The parts of `concurrent.futures.Future` a caller uses, without its per-message cost."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch, self._index = batch, index

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
        """Call `callback(self)` once done (at once if it is), from the Producer's thread.
        It must not block: the Producer's next batches wait for that thread. A `send`
        that would wait for room, or a `flush`, raises RuntimeError there instead."""
        batch = self._batch
        with batch.lane.lock:
            if not batch.done.is_set():
                if batch.callbacks is None:
                    batch.callbacks = []
                batch.callbacks.append((callback, self))
                return
        _run_callback(callback, self)

    def __repr__(self) -> str:
        if not self.done():
            return "<SentMessage pending>"
        if self._batch.error is not None:
            return f"<SentMessage failed: {type(self._batch.error).__name__}>"
        return f"<SentMessage offset={self.result()}>"


_NO_WAIT_IN_CALLBACK = (
    "{what} in a SentMessage callback, which runs on the Producer's own thread: the "
    "batches it would wait for need that thread; do this from another thread"
)


class _NotDoneYet(SMQTimeoutError, TimeoutError):
    """A wait on a SentMessage (or flush) ended before the batch was answered."""

    code = "DEADLINE_EXCEEDED"


def _run_callback(callback: Callable[[SentMessage], Any], message: SentMessage) -> None:
    try:
        callback(message)
    except Exception:  # as concurrent.futures does: a callback's error is logged, not raised
        log.exception("a SentMessage callback raised")


class Producer:
    """Sends messages in batches from its own threads; `send` is thread-safe.

    `Producer(client, *, linger=0.0, batch_size=5000, max_batch_bytes=3 MiB,
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
        batch_size: int = DEFAULT_PRODUCER_BATCH,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        timeout: float | None = None,
    ) -> None:
        check_settings(
            linger,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
        )
        self._client = client
        self._linger, self._batch_size, self._max_batch_bytes = linger, batch_size, max_batch_bytes
        self._max_pending, self._max_pending_bytes = max_pending, max_pending_bytes
        self._timeout = client.timeout if timeout is None else timeout
        self._local = threading.local()  # .lanes: this thread's lanes, by topic
        self._tickets = itertools.count()  # next() is atomic: a message's place in line
        # Guarded by _lock, changed once per batch:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # sender threads wait for a batch
        self._room = threading.Condition(self._lock)  # send() waits for room
        self._lanes: list[_Lane] = []
        self._flying: set[_Batch] = set()
        self._answered = 0  # messages whose batch is answered (or that never got in)
        self._queued_bytes = 0  # of the full and the flying batches
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
        data = payload if type(payload) is bytes else as_bytes(payload)
        cost = message_cost(data)
        if self._closing:
            raise RuntimeError("this Producer is closed; create a new one")
        lanes = getattr(self._local, "lanes", None)
        lane = lanes.get(topic) if lanes is not None else None
        if lane is None:
            lane = self._new_lane(topic)
        filling = lane.filling
        ticket = next(self._tickets)
        if (
            ticket - self._answered >= self._max_pending
            or self._queued_bytes + (filling.size if filling else 0) + cost
            > self._max_pending_bytes
        ):
            self._wait_for_room(ticket, lane, cost, timeout)
        with lane.lock:
            if self._closing:  # checked again under the lock close() takes to fail leftovers
                raise RuntimeError("this Producer is closed; create a new one")
            batch = lane.filling
            moved = 0  # bytes of a full batch put in line
            if batch is not None and batch_full(
                len(batch.payloads), batch.size, cost, self._batch_size, self._max_batch_bytes
            ):
                lane.full.append(batch)
                moved, batch = batch.size, None
            fresh = batch is None
            if batch is None:
                batch = lane.filling = _Batch(lane)
            index = len(batch.payloads)
            batch.payloads.append(data)
            batch.size += cost
        if fresh:  # once per batch: count what is in line, wake a sender thread
            self._batch_started(lane, moved)
        return SentMessage(batch, index)

    def _new_lane(self, topic: str) -> _Lane:
        lane = _Lane(topic)
        lanes = getattr(self._local, "lanes", None)
        if lanes is None:
            lanes = self._local.lanes = {}
        lanes[topic] = lane
        with self._lock:
            self._lanes.append(lane)
        return lane

    def _batch_started(self, lane: _Lane, moved: int) -> None:
        with self._lock:
            self._queued_bytes += moved
            if not lane.busy:
                self._work.notify()
        # Let a waiting sender thread have the GIL now: threads that only send would keep
        # it for the whole switch interval (5 ms), and the requests would wait behind them.
        time.sleep(0)

    def _wait_for_room(self, ticket: int, lane: _Lane, cost: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        own_thread = self._on_own_thread()
        with self._lock:
            while True:
                filling = lane.filling
                queued = self._queued_bytes + (filling.size if filling else 0)
                if ticket - self._answered < self._max_pending and (
                    queued + cost <= self._max_pending_bytes or queued == 0
                ):  # a message larger than max_pending_bytes goes once nothing else waits
                    return
                for each in self._lanes:  # what waits should leave now, linger or not
                    if each.filling is not None:
                        each.filling.urgent = True
                self._work.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._closing or own_thread or (remaining is not None and remaining <= 0):
                    self._answered += 1  # this ticket leaves the line unsent
                    self._room.notify_all()
                    if self._closing:
                        raise RuntimeError("this Producer is closed; create a new one")
                    if own_thread:
                        raise RuntimeError(
                            _NO_WAIT_IN_CALLBACK.format(what="send() waited for room")
                        )
                    raise SMQTimeoutError(
                        f"could not queue a message: {ticket - self._answered + 1} messages "
                        f"({queued} bytes) still wait after {timeout} s; "
                        "the server is slow or unreachable"
                    )
                self._room.wait(remaining)

    def flush(self, timeout: float | None = None) -> None:
        """Send what waits now and wait until every message sent before this call is
        answered (committed or failed: see each SentMessage). SMQTimeoutError after
        `timeout` seconds (None: for ever)."""
        if self._on_own_thread():
            raise RuntimeError(_NO_WAIT_IN_CALLBACK.format(what="flush()"))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            batches = list(self._flying)
            for lane in self._lanes:
                with lane.lock:
                    batches += lane.full
                    if lane.filling is not None:
                        lane.filling.urgent = True
                        batches.append(lane.filling)
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
        self._fail_unsent(RuntimeError("the Producer was closed before this message was sent"))

    def _fail_unsent(self, error: BaseException) -> None:
        """Answer what a send racing close() left in a lane, so that no future hangs."""
        unsent: list[_Batch] = []
        with self._lock:
            for lane in self._lanes:
                with lane.lock:
                    unsent += lane.full
                    lane.full.clear()
                    if lane.filling is not None:
                        unsent.append(lane.filling)
                        lane.filling = None
        for batch in unsent:
            batch.finish(0, error)

    def _on_own_thread(self) -> bool:
        """Whether this is one of the Producer's threads (in a done-callback)."""
        return threading.current_thread() in self._threads

    # -- the Producer's threads ------------------------------------------------------------

    def _send_batches(self) -> None:
        while True:
            with self._lock:
                batch = self._take_batch()
                if batch is None:
                    return
            first, error = self._produce(batch)
            # Done before it leaves _flying: a flush() in between must find it done.
            callbacks = batch.resolve(first, error)
            with self._lock:
                batch.lane.busy = False
                self._flying.discard(batch)
                self._answered += len(batch.payloads)
                self._queued_bytes -= batch.size
                self._room.notify_all()
                if self._closing:  # every sender thread must see whether anything is left
                    self._work.notify_all()
                else:
                    self._work.notify()  # the lane's next batch may go now
            for callback, message in callbacks:
                _run_callback(callback, message)

    def _take_batch(self) -> _Batch | None:
        """The next batch to send (its lane then busy), waiting for one; None once closing
        with nothing left. Called with the Producer's lock held."""
        while True:
            now = time.monotonic()
            wake_at = None
            for lane in self._lanes:
                if lane.busy:
                    continue
                with lane.lock:
                    batch = self._ready_batch(lane, now)
                    if batch is None:
                        if lane.filling is not None:
                            ready_at = lane.filling.born + self._linger
                            wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                        continue
                lane.busy = True
                self._flying.add(batch)
                return batch
            self._forget_idle_lanes()
            if self._closing and all(
                lane.filling is None and not lane.full for lane in self._lanes
            ):
                self._work.notify_all()  # the others waiting for a lane to free up: stop too
                return None
            self._work.wait(None if wake_at is None else max(0.0, wake_at - now))

    def _ready_batch(self, lane: _Lane, now: float) -> _Batch | None:
        """The lane's batch that may go now, taken out of the lane (its lock held)."""
        if lane.full:
            return lane.full.popleft()
        batch = lane.filling
        if batch is None:
            return None
        if (
            batch.urgent
            or self._closing
            or now >= batch.born + self._linger
            or len(batch.payloads) >= self._batch_size
        ):
            lane.filling = None
            self._queued_bytes += batch.size
            return batch
        return None

    def _forget_idle_lanes(self) -> None:
        """Drop the lanes of threads that ended with nothing left in them (a thread per
        request would otherwise grow the list for ever). Producer's lock held."""
        self._lanes = [lane for lane in self._lanes if lane.owner.is_alive() or not lane.idle()]

    def _produce(self, batch: _Batch) -> tuple[int, BaseException | None]:
        try:
            request = rpcs.produce_batch(batch.lane.topic, batch.payloads)
            offsets = self._client._run(request, self._timeout)
        except Exception as exc:  # an SMQError, or a closed client: the futures must not hang
            return 0, exc
        if len(offsets) != len(batch.payloads):
            return 0, SMQProduceError(
                f"the server answered {len(offsets)} offsets for a batch of "
                f"{len(batch.payloads)} messages to {batch.lane.topic!r}"
            )
        return offsets.start, None
