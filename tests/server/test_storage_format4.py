"""Format 4, written for flash wear (docs/flash-wear.md): 512-byte pages, no auto_vacuum,
one table keyed by (topic slot, first offset), topic counters saved lazily. Every
counter must come back right after a stop at any point (nothing saved since the last
trim), topics must never see each other's rows whatever slots they get, and files of
format 3 (4 KiB pages, the shared `batches` table) are rebuilt on start with nothing
lost, or refused in one line with the file unchanged when there is no room."""
from __future__ import annotations

import random
import shutil
import sqlite3
import struct
from pathlib import Path

import apsw
import pytest
from support.disks import tmpfs
from support.formats import THIRD, write_third_format
from support.servers import assert_one_line_refusal, start_and_fail

from smq._proto import smq_pb2
from smq.errors import ResourceExhausted
from smq.server import batches
from smq.server.formats import MAX_OFFSET, PAGE_SIZE, SCHEMA_VERSION, SLOTS
from smq.server.storage import Storage
from smq.server.topic_state import stored_messages


def open_storage(path: Path) -> Storage:
    return Storage(str(path))


def counters(store: Storage) -> dict[str, tuple]:
    return {name: (t.earliest, t.next_offset, t.stored_bytes)
            for name, t in store.load_topics().items()}


@pytest.mark.parametrize("seed", range(6))
def test_counters_come_back_right_from_rows_appended_since_the_last_save(tmp_path, seed):
    """Appends never save the topic row; trims do. Reopened at random points, every
    topic's earliest offset, next offset and stored bytes equal what its rows hold."""
    rng = random.Random(seed)
    path = tmp_path / "c.db"
    store = open_storage(path)
    stored: dict[str, dict[int, bytes]] = {"a": {}, "b": {}}
    next_offset = {"a": 1, "b": 1}
    with store.write_transaction():
        topics = {name: store.insert_topic(name) for name in stored}
    for _ in range(60):
        name = rng.choice("ab")
        topic = topics[name]
        with store.write_transaction():
            if rng.random() < 0.7 or not stored[name]:
                run = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 40))]
                store.append(topic, run)
                for offset, payload in enumerate(run, next_offset[name]):
                    stored[name][offset] = payload
                next_offset[name] += len(run)
            else:
                until = rng.randint(min(stored[name]) - 1, max(stored[name]))
                store.trim(topic, until)
                stored[name] = {o: p for o, p in stored[name].items() if o > until}
            store.save_counters([topic])  # what the writer does: only trims save
        if rng.random() < 0.2:
            store.close()
            store = open_storage(path)
            topics = store.load_topics()
        want = {n: (min(s) if s else None, next_offset[n], sum(map(len, s.values())))
                for n, s in stored.items()}
        assert {n: (t.earliest, t.next_offset, t.stored_bytes) for n, t in topics.items()} == want
        assert counters(store) == want
    assert stored_messages(store._writer) == [
        (n, o, p) for n in ("a", "b") for o, p in sorted(stored[n].items())]
    store.close()


def test_appends_leave_the_topic_row_alone_and_trims_save_it(tmp_path):
    store = open_storage(tmp_path / "r.db")
    with store.write_transaction():
        topic = store.insert_topic("t")
    row = lambda: store._writer.execute(  # noqa: E731
        "SELECT next_offset, stored_bytes FROM topics WHERE name = 't'").fetchone()
    with store.write_transaction():
        store.append(topic, [b"abc", b"de"])
        store.save_counters([topic])
    assert row() == (1, 0) and topic.unsaved
    with store.write_transaction():
        store.trim(topic, 1)
        store.save_counters([topic])
    assert row() == (3, 2) and not topic.unsaved
    with store.write_transaction():
        store.append(topic, [b"f"])
        store.save_counters([topic], every_change=True)  # the writer's periodic save
    assert row() == (4, 3)
    store.close()


def test_topics_in_any_slots_never_see_each_others_rows(tmp_path):
    """Slots go round from the last one given, skip those in use, and come back to a
    freed one only after all others: a deleted topic's slot holds nothing of it."""
    store = open_storage(tmp_path / "s.db")
    with store.write_transaction():
        keep = store.insert_topic("keep")  # slot 0
        store.append(keep, [b"k1", b"k2"])
        store._writer.execute("UPDATE meta SET value = ? WHERE key = 'next_slot'", (SLOTS - 1,))
        last = store.insert_topic("last")  # slot SLOTS - 1
        wrapped = store.insert_topic("wrapped")  # slot 0 is taken: slot 1
        store.append(last, [b"l1"])
        store.append(wrapped, [b"w1", b"w2", b"w3"])
    assert [t.key_base >> 44 for t in (keep, last, wrapped)] == [0, SLOTS - 1, 1]
    with store.write_transaction():
        store.delete_topic(keep)
        again = store.insert_topic("keep")  # back, in the next free slot, empty
        store.append(again, [b"new"])
    assert again.key_base >> 44 == 2 and again.next_offset == 4
    assert stored_messages(store._writer) == [
        ("keep", 3, b"new"), ("last", 1, b"l1"),
        ("wrapped", 1, b"w1"), ("wrapped", 2, b"w2"), ("wrapped", 3, b"w3")]
    assert store.read_page(keep.key_base, 1, 100, 10**6) == []  # the old slot: empty
    assert store.read_one(last.key_base, 2) is None
    assert store.read_page(wrapped.key_base, 2, 100, 10**6) == [(2, b"w2"), (3, b"w3")]
    store.close()


def test_a_topic_refuses_offsets_beyond_the_highest_stored(tmp_path):
    store = open_storage(tmp_path / "m.db")
    with store.write_transaction():
        topic = store.insert_topic("t")
    topic.next_offset = MAX_OFFSET - 1
    with store.write_transaction():
        assert store.append(topic, [b"a", b"b"]) == 2
    with pytest.raises(ResourceExhausted, match="highest"), store.write_transaction():
        store.append(topic, [b"c"])
    assert store.read_page(topic.key_base, MAX_OFFSET - 1, 10, 10**6) == [
        (MAX_OFFSET - 1, b"a"), (MAX_OFFSET, b"b")]
    store.close()


def test_sizes_take_the_fewest_bytes_and_older_widths_still_read():
    for longest, width in ((255, 1), (256, 2), (65535, 2), (65536, 4)):
        payloads = [b"x" * longest, b"", b"y"]
        [row] = [batches._row(7, payloads)]
        assert len(row[3]) == 3 * width
        assert [p for _, p in batches.unpack(*row)] == payloads
    old = (1, 3, b"abbccc", struct.pack("<3I", 1, 2, 3))  # formats 2 and 3: uint32
    assert list(batches.unpack(*old, 2)) == [(2, b"bb"), (3, b"ccc")]


# -- format 3 files ------------------------------------------------------------------

@pytest.mark.process
def test_a_third_format_database_is_rebuilt_with_small_pages_and_nothing_lost(
        start_server, tmp_path: Path):
    db = tmp_path / "v3.db"
    write_third_format(db, THIRD, deleted="gone")
    (tmp_path / "v3.db.rebuild").write_bytes(b"left by a rebuild that was stopped")
    server = start_server(db=db)
    stub = server.stub()
    for name in ("alpha", "beta"):
        messages = [p for run in THIRD[name] for p in run]
        page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=name, start_offset=1,
                                                             limit=5000))
        assert [(m.offset, m.message) for m in page.messages] == list(enumerate(messages, 5))
    assert stub.GetCommittedOffset(
        smq_pb2.GetCommittedOffsetRequest(consumer="c", topic="alpha")).offset == 6
    produced = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="alpha", messages=[b"n"]))
    assert produced.first_offset == 5 + 54
    created = stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="gone"))
    assert created.created and stub.Produce(
        smq_pb2.ProduceRequest(topic="gone", message=b"back")).offset == 6  # offsets go on
    assert server.terminate() == 0
    assert not (tmp_path / "v3.db.rebuild").exists()

    conn = apsw.Connection(str(db))
    try:
        assert conn.pragma("user_version") == SCHEMA_VERSION
        assert (conn.pragma("page_size"), conn.pragma("auto_vacuum")) == (PAGE_SIZE, 0)
        assert conn.execute("PRAGMA integrity_check").get == "ok"
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'batches'").get == 0
        assert stored_messages(conn) == (
            [("alpha", o, p) for o, p in enumerate([p for r in THIRD["alpha"] for p in r]
                                                    + [b"n"], 5)]
            + [("gone", 6, b"back")]
            + [("beta", o, p) for o, p in enumerate([p for r in THIRD["beta"] for p in r], 5)])
    finally:
        conn.close()


@pytest.mark.process
def test_a_rebuild_short_of_space_refuses_to_start_and_keeps_the_file(tmp_path: Path):
    """A file of format 4 still in 4 KiB pages (its rebuild was stopped) on a disk that
    cannot hold its copy: one line (exit 2), and the file as it was."""
    written = tmp_path / "big.db"
    write_third_format(written, {"t": [[bytes([n % 256]) * 1000] for n in range(2500)]}, "")
    store = Storage(str(written))  # migrates and rebuilds...
    store.close()
    db = sqlite3.connect(written, isolation_level=None)  # ...then back to 4 KiB pages
    db.execute("PRAGMA journal_mode = DELETE")
    db.execute("PRAGMA page_size = 4096")
    db.execute("VACUUM")
    db.close()
    with tmpfs(tmp_path / "small", "4m") as mount:  # fits the file, not its copy
        target = mount / "big.db"
        shutil.copyfile(written, target)
        assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(target)),
                                "no room to rebuild it", "unchanged")
        assert not Path(str(target) + ".rebuild").exists()
        conn = apsw.Connection(str(target))
        try:
            assert (conn.pragma("user_version"), conn.pragma("page_size")) == (4, 4096)
            assert conn.execute("PRAGMA integrity_check").get == "ok"
            assert len(stored_messages(conn)) == 2500
        finally:
            conn.close()
