"""AsyncProducer: many small sends, batched per topic into ProduceBatch calls.

    async with client.producer(linger=0.005) as producer:
        future = await producer.send("sensors", b'{"t": 21.5}')   # waits for room
        offset = await future                                     # once its batch commits

- `send` waits while `max_pending` messages, or `max_pending_bytes` of them, are pending
  (sent to the producer and not yet answered): back-pressure, so memory stays bounded.
- Per topic, at most one batch is in flight, so offsets increase in send order; batches
  of different topics are in flight together, up to `max_in_flight`.
- A batch leaves when a sender is free and it is full (`batch_size` messages or
  `max_batch_bytes`), or its oldest message has waited `linger` seconds (0: at once);
  while every sender is busy, messages gather into larger batches.
- A failed batch fails exactly its messages' futures, with the batch's SMQError (a
  ProduceBatch is atomic: all of it is appended, or none). Batches are never retried.
- `flush()` sends everything pending now and waits for the answers; `close()` (or leaving
  `async with`) refuses further sends, then flushes.

Runs in the event loop of its client; nothing here blocks it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import TYPE_CHECKING

from . import rpcs
from .producer import check_settings
from .types import USE_CLIENT_DEFAULT, Payload, as_bytes, batch_full, message_cost

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = ["AsyncProducer"]


@dataclasses.dataclass
class _Pending:
    payload: bytes
    future: asyncio.Future[int]
    since: float  # loop time when it was sent to the producer


@dataclasses.dataclass
class _TopicQueue:
    """The messages of one topic not sent to the server yet, oldest first."""

    items: collections.deque[_Pending] = dataclasses.field(default_factory=collections.deque)
    cost: int = 0  # their message_cost, summed

    def full(self, batch_size: int, max_bytes: int) -> bool:
        return len(self.items) >= batch_size or self.cost >= max_bytes

    def take(self, batch_size: int, max_bytes: int) -> list[_Pending]:
        """The next batch: as many of the oldest messages as fit (at least one)."""
        batch: list[_Pending] = []
        size = 0
        while self.items:
            cost = message_cost(self.items[0].payload)
            if batch_full(len(batch), size, cost, batch_size, max_bytes):
                break
            batch.append(self.items.popleft())
            size += cost
        self.cost -= size
        return batch


class AsyncProducer:
    """Batches `send`s per topic over an AsyncClient (from `AsyncClient.producer()`)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        linger: float,
        batch_size: int,
        max_batch_bytes: int,
        max_in_flight: int,
        max_pending: int,
        max_pending_bytes: int,
    ) -> None:
        check_settings(
            linger,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
        )
        self.client = client
        self.linger = linger
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._queues: dict[str, _TopicQueue] = {}  # in turn order: served first, first
        self._busy: set[str] = set()  # topics with a batch in flight
        # batches in flight: their task and their messages' futures
        self._senders: dict[asyncio.Task[None], list[asyncio.Future[int]]] = {}
        self._pending = 0  # messages sent to the producer, not answered yet
        self._pending_bytes = 0  # their message_cost
        self._room = asyncio.Event()
        self._room.set()
        self._timer: asyncio.TimerHandle | None = None
        self._hurry = 0  # flushes running: no lingering
        self._closed = False

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Messages sent to the producer whose future is not resolved yet."""
        return self._pending

    async def send(self, topic: str, payload: Payload) -> asyncio.Future[int]:
        """Queue one message (bytes, or str sent as UTF-8) for `topic`, waiting while
        `max_pending` messages are pending. Returns a future of its offset, which raises
        its batch's SMQError if the batch fails. Raises RuntimeError once closed."""
        data = as_bytes(payload)
        cost = message_cost(data)
        while True:
            if self._closed:
                raise RuntimeError("this AsyncProducer is closed; create a new one")
            if not self._full(cost):
                break
            self._room.clear()
            await self._room.wait()
        loop = asyncio.get_running_loop()
        pending = _Pending(data, loop.create_future(), loop.time())
        queue = self._queues.setdefault(topic, _TopicQueue())
        queue.items.append(pending)
        queue.cost += cost
        self._pending += 1
        self._pending_bytes += cost
        self._dispatch()
        return pending.future

    def _full(self, cost: int) -> bool:
        """Whether one more message of `cost` must wait: `max_pending` messages pending,
        or `max_pending_bytes` (a larger message goes once nothing else is pending)."""
        return self._pending >= self.max_pending or (
            self._pending_bytes > 0 and self._pending_bytes + cost > self.max_pending_bytes
        )

    async def flush(self) -> None:
        """Send every message pending now at once (no lingering) and wait until each has
        its answer. Failures stay in their futures; flush itself does not raise them."""
        futures = [p.future for q in self._queues.values() for p in q.items]
        futures += [f for batch in self._senders.values() for f in batch if not f.done()]
        if not futures:
            return
        self._hurry += 1
        try:
            self._dispatch()
            await asyncio.wait(futures)  # unlike gather, leaves them alone if cancelled
        finally:
            self._hurry -= 1

    async def close(self) -> None:
        """Refuse further sends (waiting ones raise RuntimeError), then `flush`. Safe
        to call more than once."""
        self._closed = True
        self._room.set()  # wake waiting senders: they raise
        while self._queues or self._senders:
            await self.flush()
            if self._senders:
                await asyncio.wait(list(self._senders))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- sending --------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start a batch for each topic that has one ready and no batch in flight, while
        fewer than `max_in_flight` are; arm a timer for the next lingering one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_due: float | None = None
        for topic in list(self._queues):
            if len(self._senders) >= self.max_in_flight:
                return  # a sender that ends dispatches again
            queue = self._queues[topic]
            if topic in self._busy:
                continue
            due = queue.items[0].since + self.linger
            ready = self._hurry or self._closed or due <= now
            if not (ready or queue.full(self.batch_size, self.max_batch_bytes)):
                next_due = due if next_due is None else min(next_due, due)
                continue
            batch = queue.take(self.batch_size, self.max_batch_bytes)
            del self._queues[topic]
            if queue.items:
                self._queues[topic] = queue  # its next turn comes after the others'
            self._busy.add(topic)
            task = loop.create_task(self._send_batch(topic, batch))
            self._senders[task] = [p.future for p in batch]
        if next_due is not None:
            self._timer = loop.call_at(next_due, self._dispatch)

    async def _send_batch(self, topic: str, batch: list[_Pending]) -> None:
        """One ProduceBatch; resolves (or fails) exactly the futures of `batch`."""
        try:
            rpc = rpcs.produce_batch(topic, [p.payload for p in batch])
            offsets = await self.client._run(rpc, USE_CLIENT_DEFAULT)
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:  # the batch's SMQError, or a closed client's RuntimeError
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, offset in zip(batch, offsets, strict=True):
                if not p.future.done():
                    p.future.set_result(offset)
        finally:
            self._pending -= len(batch)
            self._pending_bytes -= sum(message_cost(p.payload) for p in batch)
            self._busy.discard(topic)
            task = asyncio.current_task()
            if task is not None:
                self._senders.pop(task, None)
            if not self._full(0):
                self._room.set()
            if self._queues:
                self._dispatch()
