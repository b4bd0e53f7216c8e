"""One memory budget for the whole server: the bytes it holds for its clients.

What is charged, across all calls, streams and connections, at multiples of the bytes
on the wire measured for each (the constants below say where the copies are):

- a request, from the moment gRPC hands its bytes over until its handler is done with
  it; a StreamProduce message until the write that carries it is committed;
- a reply page (BulkRetrieve, Subscribe, StreamConsume) while it is built, then while
  the reply waits for its client: until gRPC's send completes (a stream's generator is
  resumed) or the call ends (a unary reply).

Rules, with `limit` the --memory-budget:

- nothing is granted beyond `limit`; replies hold at most three quarters of it (so
  that readers who do not read cannot keep every writer out), one call at most a
  quarter, one connection at most half;
- the last eighth (the reserve) goes only to connections that hold little (under
  1/16 of the reserve with the grant; for requests, whose connection is not known
  yet, only to small requests), so that ordinary clients keep working while others
  hold the rest;
- a page that does not fit is made smaller (down to MIN_GRANT's worth; one message
  always goes out); a charge that does not fit even so waits up to `wait_seconds`
  for memory to be freed, unless its own connection already holds some (it is told
  at once), then fails with Overloaded (RESOURCE_EXHAUSTED). A request never waits:
  it is refused as it arrives;
- a reply that has waited for its client longer than `stall_seconds` ends its call
  (the watcher thread cancels it, which frees what gRPC holds for it too);
- at most `builders` large pages (over BUILD_BYTES to build) are built at once: a
  burst of page requests otherwise kept every thread busy on the GIL, and everyone
  else's calls waited for it (a build slot is waited for like memory).

Who calls what:

- gRPC's polling thread (request deserializers): `take_request`, never blocking long;
- the threads running handlers: `open_call`, then the CallMemory's `take_page`, `hold`,
  `taken`; `Writes` releases StreamProduce messages as their writes commit;
- any thread: `Charge.release` and `CallMemory.close` (gRPC runs the callbacks of a
  call's end where it ends; the garbage collector releases a request gRPC dropped);
- the watcher thread (`start`/`stop`): ends stalled calls, and once a second tells
  `on_tick` whether the budget has drained after a burst (the server then gives freed
  memory back to the system, see smq/server/malloc.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import Overloaded

log = logging.getLogger(__name__)

MIB = 1024**2
# A reply waiting for its client: our encoded bytes and gRPC core's copy of them
# (measured: 20 stalled 3 MB replies raised a bare grpcio server's RSS by 5.85 MB each).
REPLY_COPIES = 2
# Building a page: the storage's (offset, payload) list, then the encoded reply beside it.
PAGE_COPIES = 2
# What each message of a page costs as Python objects beyond its payload: the tuple,
# the int, the bytes header, the list slot, and the reply's framing pieces.
MESSAGE_OBJECT_BYTES = 200
# A request: the parsed message, the payloads copied out of it for the writer, and the
# rows the storage packs them into while it writes them.
REQUEST_COPIES = 3
SMALL_REQUEST = 64 * 1024  # requests charged at most this may use the reserve
MIN_GRANT = 64 * 1024  # a page is made smaller down to this charge, not further
BUILD_BYTES = 1024**2  # pages that charge more than this to build take a build slot
BUILDERS = 2
WAIT_SECONDS = 0.5
STALL_SECONDS = 30.0
WATCH_SECONDS = 1.0
DRAINED_AFTER = 16 * MIB  # a burst of at least this much, three quarters released: drained
MINIMUM_LIMIT = 16 * MIB


def minimum_limit(largest_request: int) -> int:
    """The smallest budget in which a request of `largest_request` bytes still fits."""
    return max(MINIMUM_LIMIT, -(-REQUEST_COPIES * largest_request * 8 // 7))


def page_cost(max_bytes: int, max_messages: int) -> int:
    """What building a page of up to `max_bytes` encoded bytes and `max_messages`
    messages may hold at its peak."""
    return PAGE_COPIES * max_bytes + MESSAGE_OBJECT_BYTES * max_messages


def held_page_cost(page: Sequence[tuple[int, bytes]]) -> int:
    """What a page of (offset, payload) pairs holds while a stream sends it message by
    message: the pairs, and the message in flight with gRPC's copy of it."""
    largest = max((len(payload) for _, payload in page), default=0)
    return (
        sum(len(payload) for _, payload in page)
        + MESSAGE_OBJECT_BYTES * len(page)
        + REPLY_COPIES * largest
    )


class MemoryBudget:
    """The server's memory budget (see the module's docstring)."""

    def __init__(
        self,
        limit: int,
        *,
        stall_seconds: float = STALL_SECONDS,
        wait_seconds: float = WAIT_SECONDS,
        builders: int = BUILDERS,
        on_tick: Callable[[bool, float], object] = lambda drained, now: None,
    ) -> None:
        self.limit = limit
        self.reply_share = limit * 3 // 4
        self.call_share = limit // 4
        self.connection_share = limit // 2
        self.reserve = limit // 8
        self.stall_seconds = stall_seconds
        self.wait_seconds = wait_seconds
        self.builders = builders
        self._building = 0
        self._on_tick = on_tick
        # Reentrant: the garbage collector may release a dropped request's Charge while
        # this thread holds the lock.
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)
        self._used = 0
        self._replies = 0  # of which held by calls (replies), not requests
        self._by_connection: dict[str, int] = collections.defaultdict(int)
        self._calls: set[CallMemory] = set()
        self._high = 0  # most used since the budget last drained
        self._stalled_ended, self._stalled_logged_at = 0, float("-inf")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def used(self) -> int:
        return self._used

    # -- requests ------------------------------------------------------------------

    def take_request(self, size: int) -> Charge | None:
        """Charge a request of `size` bytes as it arrives; None if it does not fit now."""
        cost = REQUEST_COPIES * size
        with self._lock:
            free = self.limit - self._used
            room = free if cost <= SMALL_REQUEST else free - self.reserve
            if cost > room:
                return None
            self._add(None, cost)
        return Charge(self, cost)

    # -- calls with replies ----------------------------------------------------------

    def open_call(self, connection: str | None, end: Callable[[], object]) -> CallMemory:
        """The memory of one call. `connection`: its peer (None: not limited per
        connection, e.g. the Unix socket's callers, who all share one peer name);
        `end`: cancels the call (used when its reply stalls)."""
        return CallMemory(self, connection, end)

    def _grant(self, call: CallMemory, want: int, minimum: int) -> int:
        """The most of `want` (at least `minimum`) that `call` may take now; 0 if not
        even `minimum`. Called with the lock held."""
        free = min(self.limit - self._used, self.reply_share - self._replies)
        room = min(want, free, self.call_share - call.held)
        holder_held = self._holder_held(call)
        if call.connection is not None:
            room = min(room, self.connection_share - holder_held)
        if room > free - self.reserve:  # only a holder of little may dip into the reserve
            room = min(room, max(free - self.reserve, self.reserve // 16 - holder_held))
        return room if room >= minimum else 0

    def _holder_held(self, call: CallMemory) -> int:
        """What the call's connection holds (the call's own, without a connection)."""
        if call.connection is None:
            return call.held
        return self._by_connection.get(call.connection, 0)

    def _charge(self, call: CallMemory, want: int, minimum: int) -> int:
        deadline = None
        build = want > BUILD_BYTES
        with self._lock:
            while True:
                if call.closed:
                    raise Overloaded("the call ended while it waited for memory")
                granted = self._grant(call, want, minimum)
                if granted and build and not call.building and self._building >= self.builders:
                    granted = 0  # memory, but no build slot
                if granted:
                    self._add(call, granted)
                    if build and not call.building:
                        call.building = True
                        self._building += 1
                    return granted
                if deadline is None:  # a holder of memory is what keeps it short: no wait
                    wait = 0.0 if self._holder_held(call) else self.wait_seconds
                    deadline = time.monotonic() + wait
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(self.refusal(want))
                self._freed.wait(remaining)

    def refusal(self, want: int) -> str:
        """Why `want` more bytes are refused now."""
        return (
            f"server memory budget exhausted: {self._used / MIB:.1f} of "
            f"{self.limit / MIB:.0f} MiB held for replies not yet taken by clients and "
            f"requests in progress, {want / MIB:.1f} MiB more wanted; retry later "
            "(or raise --memory-budget)"
        )

    def _add(self, call: CallMemory | None, size: int) -> None:
        self._used += size
        self._high = max(self._high, self._used)
        if call is not None:
            self._replies += size
            call.held += size
            if call.connection is not None:
                self._by_connection[call.connection] += size

    def _release(self, call: CallMemory | None, size: int) -> None:
        if not size:
            return
        with self._lock:
            self._used -= size
            if call is not None:
                self._replies -= size
                call.held -= size
                if call.connection is not None:
                    left = self._by_connection[call.connection] - size
                    if left:
                        self._by_connection[call.connection] = left
                    else:
                        del self._by_connection[call.connection]
            self._freed.notify_all()

    def _set_held(self, call: CallMemory, size: int, waiting: bool) -> None:
        """Make `call` hold exactly `size` (more may exceed the limit: the memory exists
        already), with its reply waiting for the client or not."""
        with self._lock:
            if call.closed:
                size, waiting = 0, False
            self._built(call)
            if size > call.held:
                self._add(call, size - call.held)
            else:
                self._release(call, call.held - size)
            call.waiting_since = (call.waiting_since or time.monotonic()) if waiting else None
            if waiting and size:
                self._calls.add(call)
            else:
                self._calls.discard(call)

    def _built(self, call: CallMemory) -> None:
        """The call's page is built (or never will be): its build slot is free."""
        if call.building:
            call.building = False
            self._building -= 1
            self._freed.notify_all()

    def _close(self, call: CallMemory) -> None:
        with self._lock:
            self._calls.discard(call)
            call.closed = True
            self._built(call)
            self._release(call, call.held)
            self._freed.notify_all()  # its own waiting charge, if any, gives up

    # -- the watcher -------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher thread (stalled calls, giving memory back)."""
        self._watcher = threading.Thread(target=self._watch, name="smq-memory", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            self.end_stalled_calls()
            self._on_tick(self.drained(), time.monotonic())

    def end_stalled_calls(self, now: float | None = None) -> int:
        """End every call whose reply has waited for its client longer than the stall
        timeout; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stalled = [call for call in self._calls if call.waited(now) > self.stall_seconds]
            for call in stalled:
                self._calls.discard(call)
        for call in stalled:
            call.end()
        if stalled:
            self._report_stalled(len(stalled), now)
        return len(stalled)

    def _report_stalled(self, count: int, now: float) -> None:
        """Log ended stalled calls at most once a minute (a hostile client makes many)."""
        self._stalled_ended += count
        if now - self._stalled_logged_at >= 60:
            log.info(
                "ended %d call(s) whose client took no reply for %gs while the server "
                "held it in memory (since the last such line)",
                self._stalled_ended,
                self.stall_seconds,
            )
            self._stalled_ended, self._stalled_logged_at = 0, now

    def drained(self) -> bool:
        """True once after each burst of at least DRAINED_AFTER bytes, when three
        quarters of it have been released."""
        with self._lock:
            if self._high < DRAINED_AFTER or self._used > self._high // 4:
                return False
            self._high = self._used
            return True


class Charge:
    """Bytes charged for a request; `release()` once they are gone. Idempotent, and
    done on garbage collection too: a request that gRPC drops unread (its call
    cancelled) must not keep its charge."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def release(self) -> None:
        size, self.size = self.size, 0
        self._budget._release(None, size)

    __del__ = release


class CallMemory:
    """What one call holds of the budget. Close it when the call ends (it is also a
    context manager); every method may be called after that and then holds nothing."""

    def __init__(
        self, budget: MemoryBudget, connection: str | None, end: Callable[[], object]
    ) -> None:
        self._budget = budget
        self.connection = connection
        self._end: Callable[[], object] | None = end
        self.held = 0
        self.waiting_since: float | None = None
        self.building = False  # holds one of the budget's build slots
        self.closed = False

    def take_page(self, max_bytes: int, max_messages: int) -> tuple[int, int]:
        """Charge for building a page of up to `max_bytes` encoded bytes and
        `max_messages` messages; returns the (bytes, messages) it may have: fewer when
        the budget is short. Raises Overloaded if not even a small page fits."""
        want = page_cost(max_bytes, max_messages)
        granted = self._budget._charge(self, want, min(want, MIN_GRANT))
        if granted >= want:
            return max_bytes, max_messages
        share = granted / want
        return max(int(max_bytes * share), 1), max(int(max_messages * share), min(max_messages, 1))

    def hold(self, size: int) -> None:
        """Hold exactly `size` bytes from now, for a reply that waits for its client."""
        self._budget._set_held(self, size, waiting=True)

    def taken(self, keep: int = 0) -> None:
        """The client took the reply: hold `keep` bytes from now, waiting for nobody."""
        self._budget._set_held(self, keep, waiting=False)

    def sending(self) -> None:
        """A stream sends one more message of what it holds (StreamConsume, message by
        message): the stall clock starts again. No lock: the watcher reads the time once."""
        self.waiting_since = time.monotonic()

    def sent(self) -> None:
        """The client took that message: the stall clock stops."""
        self.waiting_since = None

    def waited(self, now: float) -> float:
        """How long its reply has waited for the client (0 if none waits)."""
        since = self.waiting_since
        return 0.0 if since is None else now - since

    def give_back(self) -> None:
        """What take_page charged is not needed (nothing was read)."""
        self.taken()

    def end(self) -> None:
        """End the call (its reply stalled)."""
        end = self._end
        if end is not None:
            end()

    def close(self) -> None:
        """Release everything; forget how to end the call (a reference kept here would
        keep the ended call alive in gRPC)."""
        self._end = None
        self._budget._close(self)

    def __enter__(self) -> CallMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Writes:
    """The charges of a StreamProduce's messages, released in order as the writes that
    carry them are committed (`committed(n)`: the next n messages are), and all of them
    when the stream ends (`with`)."""

    def __init__(self) -> None:
        self._charges: collections.deque[Charge] = collections.deque()

    def add(self, charge: Charge) -> None:
        self._charges.append(charge)

    def committed(self, count: int) -> None:
        for _ in range(min(count, len(self._charges))):
            self._charges.popleft().release()

    def __enter__(self) -> Writes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.committed(len(self._charges))
