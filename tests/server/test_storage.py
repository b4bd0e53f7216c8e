"""Storage and its row format in-process (smq/server/storage.py, batches.py): rows pack
and unpack to the same messages, and what a write transaction stores reads back the
same, also from a new Storage on the same file. (test_storage_layout.py has trims
across rows and the migration from the first format.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smq.server import batches
from smq.server.clock import ClockState
from smq.server.storage import Storage

payload_lists = st.lists(st.binary(max_size=300), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(payload_lists, st.integers(1, 2**62))
def test_rows_unpack_to_the_messages_packed(payloads: list[bytes], first: int):
    rows = batches.pack(first, payloads, sum(map(len, payloads)))
    unpacked = [m for row in rows for m in batches.unpack(*row)]
    assert unpacked == list(enumerate(payloads, start=first))
    for offset, payload in unpacked:
        [row] = [r for r in rows if r[0] <= offset <= r[1]]
        assert batches.message(*row, offset) == payload
        assert list(batches.unpack(*row, offset))[0] == (offset, payload)


def test_rows_stay_below_the_row_size_except_a_single_large_message():
    big = b"x" * (batches.ROW_PAYLOAD_BYTES + 1)
    payloads = [b"a" * 1000] * 200 + [big] + [b"b"] * 3
    rows = batches.pack(1, payloads, sum(map(len, payloads)))
    assert all(len(r[2]) <= batches.ROW_PAYLOAD_BYTES or r[0] == r[1] for r in rows)
    assert [m for r in rows for m in batches.unpack(*r)] == list(enumerate(payloads, start=1))
    assert batches.message(*rows[0], 10**6) is None


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "q.db")


def write(store: Storage, name: str, *runs: list[bytes], now: int = 1_800_000_000):
    with store.write_transaction():
        topic = store.load_topics().get(name) or store.insert_topic(name)
    for run in runs:
        with store.write_transaction():
            store.append(topic, run, now=now)
            store.save_counters([topic])
    return topic


def test_what_is_written_reads_back_also_after_reopening(path: str):
    store = Storage(path)
    runs = [[b"a", b"bb"], [b"c" * 70_000], [b"d", b"", b"e"]]
    topic = write(store, "t", *runs)
    expected = list(enumerate([p for run in runs for p in run], start=1))
    assert store.read_page(topic.key_base, 1, 100, 10**9) == expected
    store.close()

    store = Storage(path)
    try:
        [loaded] = store.load_topics().values()
        assert (loaded.name, loaded.earliest, loaded.next_offset, loaded.stored_bytes) == (
            "t", 1, 7, 3 + 70_000 + 2)
        assert store.read_page(loaded.key_base, 3, 100, 10**9) == expected[2:]
        assert store.read_one(loaded.key_base, 2) == b"bb"
        assert store.read_one(loaded.key_base, 5) == b""
        assert store.read_one(loaded.key_base, 7) is None
    finally:
        store.close()


def test_pages_stop_at_the_count_and_the_bytes_but_hold_one_message(path: str):
    store = Storage(path)
    try:
        topic = write(store, "t", [b"x" * 100] * 10)
        assert [o for o, _ in store.read_page(topic.key_base, 1, 3, 10**9)] == [1, 2, 3]
        assert [o for o, _ in store.read_page(topic.key_base, 4, 100, 250)] == [4, 5]
        assert [o for o, _ in store.read_page(topic.key_base, 9, 100, 1)] == [9]  # at least one
        assert store.read_page(topic.key_base, 11, 100, 10**9) == []
    finally:
        store.close()


def test_a_deleted_topic_keeps_only_its_next_offset(path: str):
    store = Storage(path)
    try:
        topic = write(store, "t", [b"1", b"2", b"3"])
        with store.write_transaction():
            store.insert_consumer("c", topic, 2)
            store.delete_topic(topic)
        assert "t" not in store.load_topics()
        assert store.consumers() == []
        with store.write_transaction():
            again = store.insert_topic("t")
        assert (again.next_offset, again.earliest, again.stored_bytes) == (4, None, 0)
    finally:
        store.close()


def test_consumers_and_the_clock_state_round_trip(path: str):
    store = Storage(path)
    topic = write(store, "t", [b"1", b"2"])
    with store.write_transaction():
        store.insert_consumer("c", topic, 1)
        assert store.update_committed("c", topic, 2)
        store.save_clock_state(ClockState(-3600, "boot-x", 12.5))
    store.close()
    store = Storage(path)
    try:
        assert store.committed_offset("c", topic.id) == 2
        assert store.committed_offset("nobody", topic.id) is None
        assert [(name, offset) for name, _, offset, _ in store.consumers()] == [("c", 2)]
        assert store.clock_state() == ClockState(-3600, "boot-x", 12.5)
    finally:
        store.close()


def test_a_failed_transaction_stores_nothing(path: str):
    store = Storage(path)
    try:
        topic = write(store, "t", [b"1"])
        with pytest.raises(RuntimeError):
            with store.write_transaction():
                store.append(topic, [b"2", b"3"])
                store.save_counters([topic])
                raise RuntimeError("the writer failed half-way")
        [loaded] = store.load_topics().values()
        assert (loaded.next_offset, loaded.stored_bytes) == (2, 1)
        assert store.read_one(loaded.key_base, 2) is None
    finally:
        store.close()
