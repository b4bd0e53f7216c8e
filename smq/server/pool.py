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
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

RECEIVES_REQUEST = "smq_receives_request"  # attribute marking a handler that receives first

_current = threading.local()


def request_arrived() -> None:
    """Called by a handler as it begins: its call's request is in; free the receive slot."""
    release = getattr(_current, "release", None)
    if release is not None:
        _current.release = None
        release()


class _Item:
    __slots__ = ("args", "fn", "future", "key", "kwargs", "receives")

    def __init__(self, future: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.key = _connection(args)
        self.receives = any(getattr(arg, RECEIVES_REQUEST, False) for arg in args)


def _connection(args: tuple) -> Any:
    for arg in args:
        call = getattr(arg, "call", None)
        if call is not None and hasattr(call, "peer"):
            try:
                return call.peer()
            except Exception:  # a call already gone: any key will do
                return None
    return None


class FairPool(Executor):
    """A thread pool for grpc.server (see the module's docstring)."""

    def __init__(
        self, threads: int, receive_slots: int, thread_name_prefix: str = "smq-rpc"
    ) -> None:
        self.receive_slots = receive_slots
        self.connection_slots = max(receive_slots // 2, 1)
        self._changed = threading.Condition()
        self._queues: dict[Any, collections.deque[_Item]] = {}  # in turn order
        self._receiving = 0
        self._receiving_by: collections.Counter = collections.Counter()
        self._shutdown = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        item = _Item(future, fn, args, kwargs)
        with self._changed:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queues.setdefault(item.key, collections.deque()).append(item)
            self._changed.notify()
        return future

    @property
    def queued(self) -> int:
        with self._changed:
            return sum(len(queue) for queue in self._queues.values())

    def _take(self) -> _Item | None:
        """The next item that may run (with the lock held): of the connections whose
        next call may run now, the one asking least (calls queued and receiving), the
        earliest in turn among equals."""
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
        return item

    def _release(self, key: Any) -> None:
        with self._changed:
            self._receiving -= 1
            self._receiving_by[key] -= 1
            if not self._receiving_by[key]:
                del self._receiving_by[key]
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
        if item.receives:
            _current.release = lambda key=item.key: self._release(key)
        try:
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn(*item.args, **item.kwargs))
                except BaseException as exc:  # handed to the future
                    item.future.set_exception(exc)
        finally:
            request_arrived()  # the handler never began (cancelled, no request): free it
            del item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
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
