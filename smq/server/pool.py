"""The threads that run gRPC's calls: fair between connections, and a bound on the
requests being received at once.

gRPC's synchronous server hands each new call to its thread pool (`submit`), and the
pool's thread first receives the call's request, then runs the handler. With a plain
FIFO pool, a client that opens hundreds of calls at once puts every other client's
calls behind them, and every thread may be receiving a 4 MB request at the same time
(100 concurrent ProduceBatch calls took the server to 709 MiB). This pool:

- takes queued calls by connection, the connection asking least first (fewest calls
  queued and receiving; in turn among equals), so that one connection's burst does
  not delay the others' calls, which come first;
- lets at most `receive_slots` calls receive their request at once (and half of those
  per connection): a call holds a slot from when its thread starts until its handler
  begins (`request_arrived`, which handlers.py calls), i.e. while gRPC reads the
  request into memory. Only calls whose handlers say they receive that way
  (`RECEIVES_REQUEST`) take one; calls of other services run as they come;
- ends calls whose requests do not arrive (a client that opens calls and never sends
  them would hold every receive slot, then gRPC's limit of concurrent calls, and lock
  everyone out): after `receive_timeout` (--stall-timeout), or after PREEMPT_SECONDS
  while another connection waits for a slot and the call's connection holds two or
  more; near gRPC's limit (`capacity`), the busiest connection's newest queued call is
  cancelled, so that other connections' calls (health checks too) still get in.
  Cancelled calls end RESOURCE_EXHAUSTED; the watcher thread does this every
  WATCH_SECONDS;
- starts all its threads at once: started on demand, the threads a burst starts would
  keep the memory the burst freed (each leaves objects of its own among the burst's,
  and Python frees a 1 MiB arena of small objects only once all of them are gone).

gRPC calls `submit(context.run, in_pool_function, rpc_event, state, behavior, ...)`;
the pool finds the connection (`rpc_event.call.peer()`) and the handler's mark among
those arguments. If a gRPC version passed them otherwise, calls would still run, in
arrival order and without the receive bound: tests/server/test_pool.py, which drives a real
gRPC server, would fail.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import grpc

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
RECEIVES_REQUEST = "smq_receives_request"  # attribute marking a handler that receives first
WATCH_SECONDS = 0.5
PREEMPT_SECONDS = 2.0  # a call receiving this long may give its slot to a waiting connection

_current = threading.local()


def request_arrived() -> None:
    """Called by a handler as it begins: its call's request is in; free the receive slot."""
    release = getattr(_current, "release", None)
    if release is not None:
        _current.release = None
        release()


class _Item:
    __slots__ = ("args", "call", "cancelled", "fn", "future", "key", "kwargs", "receives", "since")

    def __init__(self, future: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.call = _grpc_call(args)
        self.key = _connection(self.call)
        self.receives = any(getattr(arg, RECEIVES_REQUEST, False) for arg in args)
        self.since = 0.0  # when it began to receive its request
        self.cancelled = False

    def cancel(self, details: str) -> None:
        """End the call now with RESOURCE_EXHAUSTED; its function then runs to no effect
        (gRPC sees the call cancelled and calls no handler), which frees its place."""
        if self.cancelled or self.call is None:
            return
        self.cancelled = True
        with contextlib.suppress(Exception):  # the call already ended
            self.call.cancel(RESOURCE_EXHAUSTED, details)


def _grpc_call(args: tuple) -> Any:
    """gRPC's call among the arguments it submits (rpc_event.call), or None."""
    for arg in args:
        call = getattr(arg, "call", None)
        if call is not None and hasattr(call, "peer") and hasattr(call, "cancel"):
            return call
    return None


def _connection(call: Any) -> Any:
    if call is None:
        return None
    try:
        return call.peer()
    except Exception:  # a call already gone: any key will do
        return None


class FairPool(Executor):
    """A thread pool for grpc.server (see the module's docstring)."""

    def __init__(
        self,
        threads: int,
        receive_slots: int,
        thread_name_prefix: str = "smq-rpc",
        capacity: int | None = None,
        receive_timeout: float | None = None,
    ) -> None:
        self.receive_slots = receive_slots
        self.connection_slots = max(receive_slots // 2, 1)
        self.capacity = capacity  # gRPC's maximum_concurrent_rpcs: calls past it are refused
        self.headroom = max(receive_slots, 1)  # kept free of the busiest connection's calls
        self.receive_timeout = receive_timeout
        self._changed = threading.Condition()
        self._queues: dict[Any, collections.deque[_Item]] = {}  # in turn order
        self._shed: collections.deque[_Item] = collections.deque()  # cancelled: run them first
        self._calls = 0  # submitted and not finished: what gRPC counts against `capacity`
        self._receiving = 0
        self._receiving_by: collections.Counter = collections.Counter()
        self._receiving_items: dict[_Item, None] = {}
        self._shutdown = False
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{n}", daemon=True)
            for n in range(threads)
        ]
        if receive_timeout is not None:
            self._threads.append(
                threading.Thread(
                    target=self._watch, name=f"{thread_name_prefix}_watch", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        item = _Item(future, fn, args, kwargs)
        with self._changed:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queues.setdefault(item.key, collections.deque()).append(item)
            self._calls += 1
            shed = self._shed_one() if self._near_capacity() else None
            self._changed.notify()
        if shed is not None:
            shed.cancel(
                "too many calls at once from this connection while the server is near its "
                "limit of concurrent calls; retry later"
            )
        return future

    def _near_capacity(self) -> bool:
        return self.capacity is not None and self._calls > self.capacity - self.headroom

    def _shed_one(self) -> _Item | None:
        """Near gRPC's limit, which refuses everyone's calls once reached: the newest
        queued call of the connection asking most (if it asks for more than one) is
        cancelled, so that other connections still get in (lock held)."""
        busiest, most = None, 1
        for key, queue in self._queues.items():
            asks = len(queue) + self._receiving_by[key]
            if asks > most:
                busiest, most = key, asks
        if busiest is None:
            return None
        queue = self._queues[busiest]
        item = queue.pop()
        if not queue:
            del self._queues[busiest]
        self._shed.append(item)  # it still runs, to no effect, to free its place in gRPC
        return item

    def _watch(self) -> None:
        """Cancel the calls that hold receive slots without their requests arriving: a
        client that opens calls and never sends their requests would hold them all."""
        assert self.receive_timeout is not None
        while not self._stop.wait(WATCH_SECONDS):
            with self._changed:
                late = self._late_receives(time.monotonic())
            for item, why in late:
                item.cancel(why)

    def _late_receives(self, now: float) -> list[tuple[_Item, str]]:
        """(lock held) Calls receiving for longer than receive_timeout; and, while
        another connection waits for a slot, the oldest of those receiving for longer
        than PREEMPT_SECONDS from connections that hold two slots or more (one upload
        on a slow link is never cut for that)."""
        assert self.receive_timeout is not None
        late = [
            (item, f"the request did not arrive within {self.receive_timeout:g} s")
            for item in self._receiving_items
            if now - item.since > self.receive_timeout and not item.cancelled
        ]
        waiting = sum(
            1
            for key, queue in self._queues.items()
            if queue[0].receives and self._receiving_by[key] < self.connection_slots
        )
        if waiting and self._receiving >= self.receive_slots:
            slow = sorted(
                (
                    item
                    for item in self._receiving_items
                    if not item.cancelled
                    and now - item.since > PREEMPT_SECONDS
                    and self._receiving_by[item.key] >= 2
                ),
                key=lambda item: item.since,
            )
            late += [
                (item, "the request is slow to arrive while other connections wait; retry")
                for item in slow[:waiting]
            ]
        return late

    @property
    def queued(self) -> int:
        with self._changed:
            return sum(len(queue) for queue in self._queues.values())

    def _take(self) -> _Item | None:
        """The next item that may run (with the lock held): of the connections whose
        next call may run now, the one asking least (calls queued and receiving), the
        earliest in turn among equals."""
        if self._shed:
            return self._shed.popleft()  # receives nothing: no slot
        chosen, least = None, None  # (a key may be None: a call of unknown connection)
        for key, queue in self._queues.items():
            if queue[0].receives and (
                self._receiving >= self.receive_slots
                or self._receiving_by[key] >= self.connection_slots
            ):
                continue
            asks = len(queue) + self._receiving_by[key]
            if least is None or asks < least:
                chosen, least = key, asks
        if least is None:
            return None
        queue = self._queues.pop(chosen)
        item = queue.popleft()
        if queue:
            self._queues[chosen] = queue  # its next call waits for the others' turn
        if item.receives:
            self._receiving += 1
            self._receiving_by[chosen] += 1
            item.since = time.monotonic()
            self._receiving_items[item] = None
        return item

    def _release(self, item: _Item) -> None:
        with self._changed:
            self._receiving -= 1
            self._receiving_by[item.key] -= 1
            if not self._receiving_by[item.key]:
                del self._receiving_by[item.key]
            self._receiving_items.pop(item, None)
            self._changed.notify()  # one more call may receive: one thread, not all of them

    def _work(self) -> None:
        while True:
            with self._changed:
                item = self._take()
                while item is None:
                    if self._shutdown:
                        return
                    self._changed.wait()
                    item = self._take()
            self._run(item)

    def _run(self, item: _Item) -> None:
        if item.receives and item in self._receiving_items:
            _current.release = lambda item=item: self._release(item)
        try:
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn(*item.args, **item.kwargs))
                except BaseException as exc:  # handed to the future
                    item.future.set_exception(exc)
        finally:
            request_arrived()  # the handler never began (cancelled, no request): free it
            with self._changed:
                self._calls -= 1
            del item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._stop.set()
        with self._changed:
            self._shutdown = True
            if cancel_futures:
                for queue in self._queues.values():
                    for item in queue:
                        item.future.cancel()
                self._queues.clear()
            self._changed.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
