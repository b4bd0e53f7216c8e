"""smq/server/write_queue.py: large writes take room before they go to the writer, so that a
small write never waits behind more than a few of them; with real threads."""
from __future__ import annotations

import threading
import time

import pytest

from support.poll import eventually
from smq.errors import Overloaded
from smq.server.write_queue import SMALL_WRITE, WriteQueue

MIB = 1024**2


class Write:
    """Stands for a stream's write: done once the writer committed it."""

    def __init__(self) -> None:
        self.committed = threading.Event()

    def done(self) -> bool:
        return self.committed.is_set()


def hold_room(queue: WriteQueue, size: int, release: threading.Event) -> threading.Thread:
    """A call whose write of `size` holds its room until `release` is set (its commit)."""
    taken = threading.Event()

    def write():
        with queue.room(size):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=write)
    thread.start()
    assert taken.wait(5)
    return thread


def test_small_writes_never_wait():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release = threading.Event()
    thread = hold_room(queue, 4 * MIB, release)
    started = time.monotonic()
    with queue.room(SMALL_WRITE):
        assert queue.queued == 4 * MIB
    queue.room_until_done(Write(), 4 * MIB, large=False)
    assert time.monotonic() - started < 0.1
    release.set()
    thread.join()
    assert queue.queued == 0


def test_a_large_write_waits_for_room_then_goes():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release = threading.Event()
    thread = hold_room(queue, 3 * MIB, release)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    with queue.room(2 * MIB):
        assert queue.queued == 2 * MIB
    assert 0.1 < time.monotonic() - started < 3
    thread.join()


def test_a_stream_write_holds_room_until_the_writer_is_done_with_it():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    write = Write()
    queue.room_until_done(write, 4 * MIB, large=True)
    assert queue.queued == 4 * MIB
    threading.Timer(0.2, write.committed.set).start()  # nobody tells the queue: it looks
    started = time.monotonic()
    with queue.room(MIB):
        assert queue.queued == MIB
    assert 0.1 < time.monotonic() - started < 3


def test_a_write_larger_than_the_limit_goes_alone():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    with queue.room(10 * MIB):
        assert queue.queued == 10 * MIB


def test_past_the_waiting_bound_and_the_wait_writes_are_refused():
    queue = WriteQueue(limit=4 * MIB, max_waiting=1, wait_seconds=0.5)
    release = threading.Event()
    holder = hold_room(queue, 4 * MIB, release)
    outcomes: list[str] = []

    def wait_for_room():
        try:
            with queue.room(MIB):
                outcomes.append("written")
        except Overloaded as exc:
            outcomes.append(str(exc))

    waiter = threading.Thread(target=wait_for_room)
    waiter.start()
    time.sleep(0.1)
    with pytest.raises(Overloaded, match="too many large writes queued"):
        with queue.room(MIB):  # one waits already: refused at once
            pass
    waiter.join()
    assert len(outcomes) == 1 and "too many large writes queued" in outcomes[0]
    release.set()
    holder.join()
    assert queue.queued == 0


def test_stream_writes_wait_longer_and_are_not_refused_for_waiting_unary_writes():
    queue = WriteQueue(limit=4 * MIB, max_waiting=1, wait_seconds=0.2, stream_wait_seconds=5)
    first = Write()
    queue.room_until_done(first, 4 * MIB, large=True)
    waiters = []
    for _ in range(3):  # three streams wait at once, past the unary writers' bound
        write = Write()
        thread = threading.Thread(target=queue.room_until_done, args=(write, 4 * MIB, True))
        thread.start()
        waiters.append((thread, write))
    time.sleep(0.5)  # longer than a unary write would wait
    first.committed.set()
    def all_got_room() -> bool:
        for thread, write in waiters:  # each that got room is written, and the next goes
            if not thread.is_alive():
                write.committed.set()
        return not any(thread.is_alive() for thread, _ in waiters)

    eventually(all_got_room, timeout=10, interval=0.01)
    for thread, write in waiters:
        assert not thread.is_alive()
        write.committed.set()
    assert queue.queued == 0


def in_thread(target, *args) -> tuple[threading.Thread, list]:
    """Run target(*args) in a thread; the list gets its result or its exception."""
    outcome: list = []

    def run():
        try:
            outcome.append(target(*args))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def write_in_turn(queue: WriteQueue, size: int, source: str, log: list[str], name: str) -> None:
    """A unary write: takes room, says it is queued (logs its name), holds the room briefly."""
    with queue.room(size, source) as queued:
        log.append(name)
        queued()


def test_a_connections_small_write_waits_until_its_earlier_large_write_is_queued():
    """The hostile review's case: a caller gave up on a large write waiting for room and
    sent a small one at once; the small one must not reach the writer first."""
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release, log = threading.Event(), []
    holder = hold_room(queue, 4 * MIB, release)
    large, _ = in_thread(write_in_turn, queue, 2 * MIB, "peer-a", log, "large")
    eventually(lambda: queue._waiting == 1)
    small, _ = in_thread(write_in_turn, queue, 100, "peer-a", log, "small")
    other, _ = in_thread(write_in_turn, queue, 100, "peer-b", log, "other")
    other.join(5)
    assert log == ["other"]  # another connection's small write never waits
    time.sleep(0.2)
    assert log == ["other"] and small.is_alive()
    release.set()
    for thread in (holder, large, small):
        thread.join(5)
    assert log == ["other", "large", "small"]


def test_a_connections_large_writes_get_room_in_the_order_they_came():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release, log = threading.Event(), []
    holder = hold_room(queue, 4 * MIB, release)
    threads = []
    for name in ("first", "second", "third"):
        threads.append(in_thread(write_in_turn, queue, 3 * MIB, "peer-a", log, name)[0])
        eventually(lambda: queue._waiting == len(threads))
    release.set()
    for thread in [holder, *threads]:
        thread.join(10)
    assert log == ["first", "second", "third"]


def test_a_refused_large_write_lets_its_connections_next_write_go():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=0.3)
    release, log = threading.Event(), []
    holder = hold_room(queue, 4 * MIB, release)
    large, outcome = in_thread(write_in_turn, queue, 2 * MIB, "peer-a", log, "large")
    eventually(lambda: queue._waiting == 1)
    write_in_turn(queue, 100, "peer-a", log, "small")  # waits for the refusal, then goes
    large.join(5)
    assert isinstance(outcome[0], Overloaded)
    assert log == ["small"]
    release.set()
    holder.join(5)
    write_in_turn(queue, 100, "peer-a", log, "later")
    assert log == ["small", "later"] and queue.queued == 0 and not queue._unqueued


def test_a_streams_large_write_holds_its_connections_line_until_queued():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    queued = queue.room_until_done(Write(), 4 * MIB, large=True, source="peer-a")
    small, outcome = in_thread(queue.room_until_done, Write(), 100, False, "peer-a")
    time.sleep(0.2)
    assert small.is_alive()
    queued()
    small.join(5)
    assert not small.is_alive() and outcome
