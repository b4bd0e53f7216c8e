"""The on-disk layout: consecutive messages share a row (smq/server/batches.py). Whatever the
batch sizes, every read, trim and byte count must be the same as if each message had
its own row; and a database written by the first format (one row per message) is
migrated on start with nothing lost."""
from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import apsw
import pytest
from support.disks import tmpfs
from support.servers import assert_one_line_refusal, start_and_fail

from smq._proto import smq_pb2
from smq.server import batches
from smq.server.formats import MIGRATIONS, SCHEMA_VERSION
from smq.server.schema import StorageOptions
from smq.server.storage import Storage
from smq.server.topic_state import stored_messages

# Runs of payloads that end up as one row, several rows (more than ROW_PAYLOAD_BYTES),
# single-message rows, one message larger than a row, and empty payloads.
RUNS = [
    [b"a", b"bb", b"", b"cccc"],
    [b"single"],
    [bytes([n % 251]) * 700 for n in range(300)],  # ~205 KiB: split over several rows
    [b""],
    [b"x" * (batches.ROW_PAYLOAD_BYTES + 10)],      # one message bigger than a row
    [b"%d" % n for n in range(1000)],
]


@pytest.fixture
def storage(tmp_path: Path):
    store = Storage(str(tmp_path / "layout.db"), StorageOptions(durability="normal"))
    yield store
    store.close()


def fill(store: Storage, runs: list[list[bytes]]):
    with store.write_transaction():
        topic = store.insert_topic("t")
    expected: list[bytes] = []
    for run in runs:
        with store.write_transaction():
            store.append(topic, run)
            store.save_counters([topic])
        expected += run
    return topic, expected


def check_counters(store: Storage, topic, expected: dict[int, bytes]) -> None:
    """In memory and on disk: earliest, next offset and stored bytes match what is stored."""
    assert topic.stored_bytes == sum(map(len, expected.values()))
    assert topic.earliest == (min(expected) if expected else None)
    loaded = store.load_topics()["t"]
    assert (loaded.earliest, loaded.next_offset, loaded.stored_bytes) == (
        topic.earliest, topic.next_offset, topic.stored_bytes)


def test_reads_see_every_message_whatever_the_rows(storage: Storage):
    topic, payloads = fill(storage, RUNS)
    expected = dict(enumerate(payloads, 1))
    rows = storage._writer.execute("SELECT count(*) FROM message_rows").get
    assert 6 < rows < len(expected) / 10  # batched, and the big run was split
    assert storage._writer.execute(
        "SELECT max(length(payloads)) FROM message_rows WHERE sizes IS NOT NULL").get <= batches.ROW_PAYLOAD_BYTES
    for offset in range(0, len(expected) + 3):
        assert storage.read_one(topic.key_base, offset) == expected.get(offset), offset
    rng = random.Random(7)
    starts = [rng.randrange(0, len(expected) + 3) for _ in range(300)]
    for start in [len(expected) + n for n in range(-2, 4)] + starts:  # and past the end
        count = rng.choice([1, 2, 5, 50, 10_000])
        max_bytes = rng.choice([1, 100, 5000, 10**9])
        page = storage.read_page(topic.key_base, start, count, max_bytes)
        want = [(o, expected[o]) for o in range(max(start, 1), len(expected) + 1)][:count]
        assert page == want[:len(page)]
        assert page or not want
        assert sum(len(p) for _, p in page[:-1]) <= max_bytes  # at least one, then within
        if len(page) < len(want):  # stopped early only for the byte limit
            assert sum(len(p) for _, p in want[:len(page) + 1]) > max_bytes
    check_counters(storage, topic, expected)
    assert [(o, p) for _, o, p in stored_messages(storage._writer)] == list(expected.items())


@pytest.mark.parametrize("seed", range(4))
def test_trims_anywhere_keep_the_rest_and_the_byte_counts(storage: Storage, seed: int):
    topic, payloads = fill(storage, RUNS)
    expected = dict(enumerate(payloads, 1))
    rng = random.Random(seed)
    until = 0
    while expected:
        until += rng.choice([1, 2, 3, 17, 150, 400])  # often inside a row
        with storage.write_transaction():
            deleted = storage.trim(topic, until)
            storage.save_counters([topic])
        gone = [o for o in expected if o <= until]
        assert deleted == len(gone), until
        for offset in gone:
            del expected[offset]
        check_counters(storage, topic, expected)
        assert [(o, p) for _, o, p in stored_messages(storage._writer)] == list(expected.items())
        if expected:
            first = min(expected)
            assert storage.read_one(topic.key_base, first) == expected[first]
            assert storage.read_one(topic.key_base, first - 1) is None
    assert topic.next_offset == len(payloads) + 1  # trims never move offsets back


def test_offset_freeing_counts_message_by_message(storage: Storage):
    topic, payloads = fill(storage, RUNS)
    total = 0
    cumulative = []
    for payload in payloads:
        total += len(payload)
        cumulative.append(total)
    for excess in (1, 2, 3, 7, 700, 701, 50_000, 140_000, total - 1, total):
        want = next(i for i, freed in enumerate(cumulative, 1) if freed >= excess)
        with storage.write_transaction():
            assert storage.offset_freeing(topic, excess) == want, excess


def write_first_format(path: Path, messages: dict[str, list[bytes]]) -> None:
    """A database as the first SMQ release wrote it: format 1, one row per message."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("PRAGMA journal_mode = WAL")
    for statement in MIGRATIONS[1]:
        db.execute(statement)
    for topic_id, (name, payloads) in enumerate(messages.items(), 1):
        db.execute("INSERT INTO topics (id, name, next_offset, stored_bytes, created_at)"
                   " VALUES (?, ?, ?, ?, 0)", (topic_id, name, len(payloads) + 3,
                                               sum(map(len, payloads))))
        # offsets 1 and 2 were trimmed before
        db.executemany("INSERT INTO messages VALUES (?, ?, ?)",
                       [(topic_id, offset, p) for offset, p in enumerate(payloads, 3)])
    db.execute("PRAGMA user_version = 1")
    db.close()


@pytest.mark.process
def test_a_first_format_database_is_migrated_with_nothing_lost(start_server, tmp_path: Path):
    db = tmp_path / "v1.db"
    old = {"alpha": [b"one", b"", b"three" * 1000], "beta": [b"b%d" % n for n in range(2000)]}
    write_first_format(db, old)

    server = start_server(db=db)
    stub = server.stub()
    for name, payloads in old.items():
        page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=name, start_offset=1, limit=5000))
        assert [(m.offset, m.message) for m in page.messages] == list(enumerate(payloads, 3))
        assert stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic=name)).offset == 3
    # It goes on after the migrated messages, in the new layout.
    produced = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="alpha", messages=[b"n1", b"n2"]))
    assert (produced.first_offset, produced.last_offset) == (6, 7)
    assert server.terminate() == 0

    conn = apsw.Connection(str(db))
    try:
        assert conn.pragma("user_version") == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'messages'").get == 0
        assert conn.execute("PRAGMA integrity_check").get == "ok"
        assert stored_messages(conn) == (
            [("alpha", o, p) for o, p in enumerate(old["alpha"] + [b"n1", b"n2"], 3)]
            + [("beta", o, p) for o, p in enumerate(old["beta"], 3)])
    finally:
        conn.close()


@pytest.mark.process
def test_a_migration_short_of_space_refuses_to_start_and_keeps_the_old_file(tmp_path: Path):
    """The copy needs room; on a full disk the migration rolls back, the server says so
    in one line (exit 2), and the file is still format 1, whole and readable."""
    written = tmp_path / "v1.db"
    old = {"t": [bytes([n % 256]) * 1000 for n in range(2500)]}  # ~2.6 MiB of messages
    write_first_format(written, old)
    with tmpfs(tmp_path / "small", "4m") as mount:  # fits the file, not its copy
        db = mount / "v1.db"
        shutil.copyfile(written, db)
        assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)),
                                "no room to migrate it to format 4", "unchanged")
        conn = apsw.Connection(str(db))
        try:
            assert conn.pragma("user_version") == 1
            assert conn.execute("PRAGMA integrity_check").get == "ok"
            assert conn.execute("SELECT payload FROM messages ORDER BY msg_offset").fetchall() == [
                (p,) for p in old["t"]]
        finally:
            conn.close()
