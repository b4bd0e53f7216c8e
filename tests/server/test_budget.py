"""smq/server/budget.py on its own: the rules of the one memory budget, with real threads.

MIB-sized numbers keep the arithmetic readable: a budget of 64 MiB has a call share of
16, a connection share of 32 and a reserve of 8 MiB; a connection holding less than
0.5 MiB may dip into the reserve.
"""
from __future__ import annotations

import gc
import threading
import time

import pytest

from support.servers import assert_one_line_refusal, start_and_fail
from smq.server.budget import (MIN_GRANT, REQUEST_COPIES, SMALL_REQUEST, Charge, MemoryBudget, Writes,
                        minimum_limit, page_cost)
from smq.errors import Overloaded
from support.poll import eventually

MIB = 1024**2


def budget(limit: int = 64 * MIB, **options) -> MemoryBudget:
    """A budget whose build slots do not get in the way, unless `builders` is given."""
    return MemoryBudget(limit, wait_seconds=options.pop("wait_seconds", 0.2),
                        builders=options.pop("builders", 100), **options)


def ended() -> tuple[list[str], callable]:
    calls: list[str] = []
    return calls, lambda: calls.append("ended")


def test_requests_fit_the_limit_and_leave_the_reserve_to_small_ones():
    memory = budget()
    big = [memory.take_request(4 * MIB) for _ in range(5)]  # 12 MiB charged each
    assert all(big[:4]) and big[4] is None  # 48 + 12 > 64 - 8
    assert memory.used == 4 * REQUEST_COPIES * 4 * MIB
    assert memory.take_request(3 * MIB) is None  # 9 MiB would dip into the reserve
    small = [memory.take_request(SMALL_REQUEST // REQUEST_COPIES) for _ in range(100)]
    assert all(small)  # small ones may (6.25 MiB of the 16 left)
    for charge in big[:4] + small:
        charge.release()
        charge.release()  # idempotent
    assert memory.used == 0


def test_a_request_charge_dropped_unreleased_is_released_by_the_garbage_collector():
    memory = budget()
    memory.take_request(MIB)  # dropped at once, as gRPC drops a request nobody reads
    gc.collect()
    assert memory.used == 0


def test_one_call_holds_a_quarter_and_one_connection_half():
    memory = budget()
    first = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    assert first.take_page(30 * MIB, 0) == (8 * MIB, 0)  # 16 MiB: the call share
    second = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    assert second.take_page(30 * MIB, 0) == (8 * MIB, 0)
    third = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    with pytest.raises(Overloaded, match="memory budget"):
        third.take_page(MIB, 0)  # the connection holds 32 MiB: refused at once
    other = memory.open_call("ipv4:10.0.0.2:2", lambda: None)
    assert other.take_page(MIB, 0) == (MIB, 0)
    for call in (first, second, third, other):
        call.close()
    assert memory.used == 0


def replies_held(memory: MemoryBudget, connection: str, size: int):
    """A call of `connection` whose reply holds `size` bytes."""
    call = memory.open_call(connection, lambda: None)
    call.hold(size)
    return call


def test_a_page_is_made_smaller_rather_than_refused():
    memory = budget()
    replies_held(memory, "ipv4:10.0.0.1:1", memory.reply_share - memory.reserve)
    reader = memory.open_call("ipv4:10.0.0.9:1", lambda: None)
    max_bytes, max_messages = reader.take_page(3 * MIB, 10_000)
    assert 0 < max_bytes < 3 * MIB and 0 < max_messages < 10_000
    assert page_cost(max_bytes, max_messages) <= memory.reserve // 16
    assert reader.held >= MIN_GRANT


def test_the_reserve_is_not_for_connections_holding_much():
    memory = budget()
    replies_held(memory, "ipv4:10.0.0.1:1", memory.reply_share - memory.reserve)
    again = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    with pytest.raises(Overloaded):
        again.take_page(MIB, 0)  # told at once: its connection holds the rest
    fresh = memory.open_call("ipv4:10.0.0.7:1", lambda: None)
    assert fresh.take_page(MIB, 0)[0] > 0


def test_replies_leave_a_quarter_to_requests():
    memory = budget()
    replies_held(memory, "ipv4:10.0.0.1:1", memory.reply_share)
    reader = memory.open_call("ipv4:10.0.0.2:1", lambda: None)
    with pytest.raises(Overloaded):
        reader.take_page(MIB, 100)
    assert memory.take_request(2 * MIB) is not None  # a 2 MB batch still goes in


def full(memory: MemoryBudget):
    """A call holding all of `memory` (hold() takes what exists already, past any rule)."""
    hog = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    hog.hold(memory.limit)
    return hog


def test_a_charge_waits_for_memory_being_freed_then_gives_up():
    memory = budget(wait_seconds=2.0)
    hog = full(memory)
    waiter = memory.open_call("ipv4:10.0.0.9:1", lambda: None)
    threading.Timer(0.2, hog.close).start()
    started = time.monotonic()
    assert waiter.take_page(MIB, 0) == (MIB, 0)
    assert 0.1 < time.monotonic() - started < 1.5
    memory.wait_seconds = 0.3
    full(memory)
    late = memory.open_call("ipv4:10.0.0.10:1", lambda: None)
    started = time.monotonic()
    with pytest.raises(Overloaded, match=r"server memory budget exhausted: .* of 64 MiB"):
        late.take_page(8 * MIB, 0)
    assert 0.25 < time.monotonic() - started < 2


def test_large_pages_are_built_a_few_at_a_time():
    memory = budget(builders=2, wait_seconds=1.0)
    first, second, third = (memory.open_call(f"ipv4:10.0.0.{n}:1", lambda: None) for n in range(3))
    first.take_page(3 * MIB, 10_000)
    second.take_page(3 * MIB, 10_000)
    small = memory.open_call("ipv4:10.0.0.9:1", lambda: None)
    assert small.take_page(256 * 1024, 1000) == (256 * 1024, 1000)  # small pages need no slot
    threading.Timer(0.2, first.hold, args=(6 * MIB,)).start()  # first's page is built
    started = time.monotonic()
    assert third.take_page(3 * MIB, 10_000) == (3 * MIB, 10_000)
    assert 0.1 < time.monotonic() - started < 0.9
    again = memory.open_call("ipv4:10.0.0.2:1", lambda: None)  # second's connection holds memory
    with pytest.raises(Overloaded):
        again.take_page(3 * MIB, 10_000)  # no slot: told at once
    for call in (first, second, third, small, again):
        call.close()
    assert memory.used == 0 and memory._building == 0


def test_hold_sets_what_a_waiting_reply_holds_and_taken_releases_it():
    memory = budget()
    call = memory.open_call("ipv4:10.0.0.1:1", lambda: None)
    call.take_page(MIB, 100)
    call.hold(5 * MIB)  # what the encoded reply and gRPC's copy of it hold
    assert (call.held, memory.used) == (5 * MIB, 5 * MIB) and call.waiting_since is not None
    call.taken(MIB)
    assert (memory.used, call.waiting_since) == (MIB, None)
    call.close()
    call.hold(MIB)  # after the end: holds nothing
    assert memory.used == 0


def test_calls_whose_reply_waits_too_long_are_ended_once():
    memory = budget(stall_seconds=30)
    slow_calls, end_slow = ended()
    quick_calls, end_quick = ended()
    slow = memory.open_call("ipv4:10.0.0.1:1", end_slow)
    quick = memory.open_call("ipv4:10.0.0.2:1", end_quick)
    slow.hold(MIB)
    quick.hold(MIB)
    quick.taken()
    now = time.monotonic()
    assert memory.end_stalled_calls(now + 10) == 0
    assert memory.end_stalled_calls(now + 31) == 1
    assert memory.end_stalled_calls(now + 62) == 0
    assert (slow_calls, quick_calls) == (["ended"], [])
    slow.close()  # what gRPC does once the call ended
    quick.close()
    assert memory.used == 0


def test_the_watcher_ends_stalled_calls_and_reports_drained_bursts():
    ticks: list[bool] = []
    memory = budget(stall_seconds=0.5, on_tick=lambda drained, now: ticks.append(drained))
    calls, end = ended()
    call = memory.open_call("ipv4:10.0.0.1:1", end)
    call.take_page(8 * MIB, 0)
    call.hold(16 * MIB)
    memory.start()
    try:
        eventually(lambda: calls, timeout=10, message="the stalled call was not ended")
        call.close()
        eventually(lambda: True in ticks, timeout=10, message="no drained tick")
    finally:
        memory.stop()
    assert calls == ["ended"] and True in ticks and memory.used == 0


def test_stream_produce_charges_go_as_their_writes_commit():
    memory = budget()
    with Writes() as writes:
        for _ in range(5):
            writes.add(memory.take_request(MIB))
        writes.committed(2)
        assert memory.used == 3 * REQUEST_COPIES * MIB
        writes.committed(0)
    assert memory.used == 0  # the stream ended: whatever was left goes too


def test_a_closed_call_stops_waiting_for_memory():
    memory = budget(wait_seconds=5.0)
    full(memory)
    waiter = memory.open_call("ipv4:10.0.0.9:1", lambda: None)
    threading.Timer(0.2, waiter.close).start()
    started = time.monotonic()
    with pytest.raises(Overloaded):
        waiter.take_page(MIB, 0)
    assert time.monotonic() - started < 2


def test_the_smallest_budget_still_takes_the_largest_request():
    assert minimum_limit(4 * MIB) == 16 * MIB
    largest = 64 * MIB + 64 * 1024
    limit = minimum_limit(largest)
    memory = budget(limit)
    first = memory.take_request(largest)
    assert isinstance(first, Charge)
    assert memory.take_request(largest) is None


def test_the_server_refuses_a_budget_too_small_for_its_largest_message(tmp_path):
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "q.db"),
                            "--max-message-size", "32MiB", "--memory-budget", "64MiB")
    assert_one_line_refusal(result, "--memory-budget", "at least")
