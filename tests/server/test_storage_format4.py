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
from smq.server.formats import MAX_OFFSET, OFFSET_BITS, PAGE_SIZE, SCHEMA_VERSION, SLOTS
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
    assert [t.key_base >> OFFSET_BITS for t in (keep, last, wrapped)] == [0, SLOTS - 1, 1]
    with store.write_transaction():
        store.delete_topic(keep)
        again = store.insert_topic("keep")  # back, in the next free slot, empty
        store.append(again, [b"new"])
    assert again.key_base >> OFFSET_BITS == 2 and again.next_offset == 4
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
                                "no room to rebuild it", "nothing is lost")
        assert not Path(str(target) + ".rebuild").exists()
        conn = apsw.Connection(str(target))
        try:
            assert (conn.pragma("user_version"), conn.pragma("page_size")) == (4, 4096)
            assert conn.execute("PRAGMA integrity_check").get == "ok"
            assert len(stored_messages(conn)) == 2500
        finally:
            conn.close()


def messages_of(db: Path) -> list[tuple[str, int, bytes]]:
    conn = apsw.Connection(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").get == "ok"
        return stored_messages(conn)
    finally:
        conn.close()


THIRD_MESSAGES = [(name, offset, payload) for name in ("alpha", "beta")
                  for offset, payload in enumerate([p for r in THIRD[name] for p in r], 5)]


@pytest.mark.process
def test_a_migration_without_room_is_refused_before_the_file_is_touched(tmp_path: Path):
    """A format-3 file alone (as a backup restores it) on a disk with about 2.5 times its
    size free: refused at once in one line, not half-way with the file in pieces."""
    written = tmp_path / "v3.db"
    write_third_format(written, {"t": [[bytes([n % 256]) * 1000] for n in range(2500)]}, "")
    size = written.stat().st_size
    with tmpfs(tmp_path / "small", f"{size * 5 // 2 // 1024}k") as mount:
        db = mount / "v3.db"
        shutil.copyfile(written, db)
        assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)),
                                "no room to migrate it to format 4", "unchanged")
        assert sorted(p.name for p in mount.iterdir()) == ["v3.db"]
        conn = apsw.Connection(str(db))
        try:
            assert (conn.pragma("user_version"), conn.pragma("page_size")) == (3, 4096)
        finally:
            conn.close()
        assert len(messages_of_third(db)) == 2500


def messages_of_third(db: Path) -> list:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT payloads FROM batches").fetchall()


def test_a_refusal_after_the_migration_committed_keeps_its_wal(tmp_path: Path, monkeypatch):
    """If the rebuild fails after the migration committed into a WAL made at this start,
    that WAL stays (it holds the migrated database), and the next start finds it all."""
    from smq.server import schema
    db = tmp_path / "v3.db"
    write_third_format(db, THIRD, deleted="gone")
    assert not Path(f"{db}-wal").exists()

    reader = apsw.Connection(str(db))

    def fail(self, conn):  # the rebuild cannot be made to fail on cue otherwise
        # As when the migration's checkpoint found no room: something committed that only
        # the WAL holds (a reader's older snapshot keeps it from the main file).
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM topics").fetchall()
        conn.execute("INSERT INTO meta VALUES ('only in the wal', 1)")
        raise schema.StartupError("the rebuild failed")
    monkeypatch.setattr(schema.DatabaseFile, "_rebuild", fail)
    with pytest.raises(schema.StartupError, match="the rebuild failed"):
        Storage(str(db))
    monkeypatch.undo()
    assert Path(f"{db}-wal").stat().st_size > 0
    reader.execute("COMMIT")
    reader.close()
    store = Storage(str(db))
    try:
        assert stored_messages(store._writer) == THIRD_MESSAGES
        assert store._writer.execute("SELECT value FROM meta WHERE key = 'only in the wal'").get
    finally:
        store.close()


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_the_rebuilt_file_keeps_the_old_ones_permissions(tmp_path: Path, mode: int):
    db = tmp_path / "v3.db"
    write_third_format(db, THIRD, deleted="gone")
    db.chmod(mode)
    Storage(str(db)).close()
    assert db.stat().st_mode & 0o777 == mode
    assert messages_of(db) == THIRD_MESSAGES


def test_a_database_behind_a_symlink_is_rebuilt_where_it_lives(tmp_path: Path):
    (tmp_path / "volume").mkdir()
    (tmp_path / "rootfs").mkdir()
    real = tmp_path / "volume" / "smq.db"
    write_third_format(real, THIRD, deleted="gone")
    link = tmp_path / "rootfs" / "smq.db"
    link.symlink_to(real)
    store = Storage(str(link))
    store.close()
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in (tmp_path / "rootfs").iterdir()) == ["smq.db"]
    assert messages_of(real) == THIRD_MESSAGES


@pytest.mark.process
def test_something_in_the_way_of_the_rebuild_is_refused_in_one_line(tmp_path: Path):
    db = tmp_path / "v3.db"
    write_third_format(db, THIRD, deleted="gone")
    (tmp_path / "v3.db.rebuild").mkdir()
    assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)),
                            "v3.db.rebuild", "in the way")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)


@pytest.mark.process
def test_a_clean_stop_saves_the_counters(start_server, tmp_path: Path):
    db = tmp_path / "stop.db"
    server = start_server(db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[b"ab", b"c"]))
    stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"def"))
    assert server.terminate() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT next_offset, stored_bytes FROM topics").fetchall() == [(4, 6)]
