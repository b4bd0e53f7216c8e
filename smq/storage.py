"""The durable log: topics and their messages in one SQLite file, through apsw.

Writes go through one connection, used only by the writer thread (writer.py),
inside `write_transaction()`. Reads use a small pool of other connections; in WAL
mode they never wait for the writer and always see whole commits.

Offsets are never reused: each topic row keeps `next_offset`, advanced by every
append and left alone by trims, so a topic trimmed empty (or a restart) goes on
from where it was. Topic names only ever reach SQL as bound parameters.

apsw errors are translated into the SMQ error tree here and nowhere else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import time
from collections.abc import Iterable, Iterator

import apsw

from .errors import StartupError, StorageFailure, StorageFull, SMQError

log = logging.getLogger(__name__)

# Format of the database file, kept in PRAGMA user_version. Raise it with a
# migration in MIGRATIONS whenever the schema changes; an older SMQ refuses a newer file.
SCHEMA_VERSION = 1
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE topics (
               id           INTEGER PRIMARY KEY,
               name         TEXT NOT NULL UNIQUE,
               next_offset  INTEGER NOT NULL DEFAULT 1,  -- never goes back: offsets are not reused
               stored_bytes INTEGER NOT NULL DEFAULT 0,  -- sum of payload sizes still stored
               created_at   INTEGER NOT NULL,            -- unix seconds
               deleted      INTEGER NOT NULL DEFAULT 0   -- kept so a re-created topic goes on
           )""",
        """CREATE TABLE messages (
               topic_id   INTEGER NOT NULL,
               msg_offset INTEGER NOT NULL,
               payload    BLOB NOT NULL,
               PRIMARY KEY (topic_id, msg_offset)
           )""",
    ),
}

DURABILITY_PRAGMAS = {
    # WAL + synchronous=FULL: the WAL is fsynced at every commit, so an ack survives power loss.
    "full": "FULL",
    # WAL + synchronous=NORMAL: fsync only at checkpoints; an ack survives a crash of
    # the process but the last commits may be lost on power loss.
    "normal": "NORMAL",
}
BUSY_TIMEOUT_MS = 10_000
WAL_SIZE_LIMIT = 64 * 1024**2  # truncate the WAL back to this after checkpoints


@dataclasses.dataclass
class TopicState:
    """What the log knows of one topic. `earliest` is None when nothing is stored."""
    id: int
    name: str
    next_offset: int
    earliest: int | None
    stored_bytes: int
    created_at: int = 0
    deleted: bool = False

    @property
    def latest(self) -> int | None:
        """Highest stored offset, or None when the topic is empty."""
        return None if self.earliest is None else self.next_offset - 1

    @property
    def message_count(self) -> int:
        # Offsets are contiguous: trims only ever remove a prefix.
        return 0 if self.earliest is None else self.next_offset - self.earliest


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Translate apsw errors raised inside the block into the SMQ error tree."""
    try:
        yield
    except SMQError:
        raise
    except apsw.FullError as exc:
        raise StorageFull(f"{action}: disk or database full") from exc
    except apsw.Error as exc:
        raise StorageFailure(f"{action}: {type(exc).__name__}: {exc}") from exc


class Storage:
    """The SQLite log. Write methods run only inside write_transaction()."""

    def __init__(self, path: str, durability: str = "full", readers: int = 4) -> None:
        self.path = path
        self._durability = durability
        self._writer = self._open_writer()
        self._readers: queue.LifoQueue[apsw.Connection] = queue.LifoQueue()
        for _ in range(readers):
            self._readers.put(self._connect(apsw.SQLITE_OPEN_READWRITE, query_only=True))

    # -- setting up -----------------------------------------------------------

    def _connect(self, flags: int, query_only: bool = False) -> apsw.Connection:
        conn = apsw.Connection(self.path, flags=flags)
        conn.setbusytimeout(BUSY_TIMEOUT_MS)
        if query_only:
            conn.pragma("query_only", True)
        return conn

    def _open_writer(self) -> apsw.Connection:
        """Open (creating if needed) and migrate the database; refuse files that are not ours."""
        where = f"database {self.path!r}"
        try:
            conn = self._connect(apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            version = conn.pragma("user_version")
            if version > SCHEMA_VERSION:
                raise StartupError(
                    f"{where} has format {version}, written by a newer SMQ; this SMQ reads "
                    f"formats up to {SCHEMA_VERSION}: upgrade SMQ, or point --dbpath at another file")
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").get:
                raise StartupError(f"{where} is an SQLite database but not an SMQ one")
            if version == 0:
                # Must be set before the first table exists; lets trims give space back.
                conn.pragma("auto_vacuum", "INCREMENTAL")
            if conn.pragma("journal_mode", "WAL") != "wal":
                raise StartupError(f"{where}: cannot switch to WAL mode (is the directory writable?)")
            conn.pragma("synchronous", DURABILITY_PRAGMAS[self._durability])
            conn.pragma("journal_size_limit", WAL_SIZE_LIMIT)
            self._migrate(conn, version)
            return conn
        except StartupError:
            raise
        except apsw.CantOpenError as exc:
            raise StartupError(f"cannot open {where}: {_open_hint(self.path)} ({exc})") from None
        except (apsw.NotADBError, apsw.CorruptError) as exc:
            raise StartupError(f"{where} is not a valid SQLite database or is damaged ({exc})") from None
        except apsw.ReadOnlyError as exc:
            raise StartupError(f"{where} is read-only ({exc})") from None
        except apsw.Error as exc:
            raise StartupError(f"cannot open {where}: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _migrate(conn: apsw.Connection, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with conn:
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                conn.pragma("user_version", target)
            log.info("database format migrated to %d", target)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close every connection."""
        while not self._readers.empty():
            self._readers.get_nowait().close()
        with contextlib.suppress(apsw.Error):
            self._writer.pragma("wal_checkpoint", "TRUNCATE")
        self._writer.close()

    # -- reading (any thread) -------------------------------------------------

    @contextlib.contextmanager
    def _reader(self, action: str) -> Iterator[apsw.Connection]:
        conn = self._readers.get()
        try:
            with storage_errors(action):
                yield conn
        finally:
            self._readers.put(conn)

    def load_topics(self, conn: apsw.Connection | None = None) -> dict[str, TopicState]:
        """Every topic with its counters, as committed."""
        sql = """SELECT id, name, next_offset, stored_bytes, created_at,
                        (SELECT min(msg_offset) FROM messages WHERE topic_id = topics.id)
                 FROM topics WHERE NOT deleted"""
        if conn is not None:
            rows = conn.execute(sql).fetchall()
        else:
            with self._reader("load topics") as reader:
                rows = reader.execute(sql).fetchall()
        return {name: TopicState(tid, name, nxt, earliest, size, created)
                for tid, name, nxt, size, created, earliest in rows}

    def read_one(self, topic_id: int, offset: int) -> bytes | None:
        """The payload at offset, or None if it is not stored."""
        with self._reader("read message") as conn:
            row = conn.execute(
                "SELECT payload FROM messages WHERE topic_id = ? AND msg_offset = ?",
                (topic_id, offset)).fetchone()
        return None if row is None else row[0]

    def read_page(self, topic_id: int, from_offset: int, max_count: int,
                  max_bytes: int) -> list[tuple[int, bytes]]:
        """Stored messages with offset >= from_offset, ascending, at most max_count of them,
        stopping before max_bytes is passed (but always at least one message)."""
        page: list[tuple[int, bytes]] = []
        size = 0
        with self._reader("read messages") as conn:
            cursor = conn.execute(
                "SELECT msg_offset, payload FROM messages"
                " WHERE topic_id = ? AND msg_offset >= ? ORDER BY msg_offset LIMIT ?",
                (topic_id, from_offset, max_count))
            for offset, payload in cursor:
                size += len(payload)
                if page and size > max_bytes:
                    break
                page.append((offset, payload))
            cursor.close()
        return page

    def check_readable(self) -> None:
        """A trivial read of the file through the pool, for liveness checks."""
        with self._reader("liveness check") as conn:
            conn.execute("SELECT count(*) FROM topics").fetchall()

    # -- writing (the writer thread only) -----------------------------------------

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[None]:
        """One transaction on the writer connection; committed (and, in full durability,
        fsynced) when the block ends, rolled back if it raises. It takes the write lock
        at once (BEGIN IMMEDIATE), so even an empty one proves the database is writable."""
        with storage_errors("write"):
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(apsw.Error):
                    self._writer.execute("ROLLBACK")
                raise
            try:
                self._writer.execute("COMMIT")
            except apsw.Error:
                if not self._writer.getautocommit():
                    self._writer.execute("ROLLBACK")
                raise

    def reload_topics(self) -> dict[str, TopicState]:
        """Topic counters as committed, read on the writer connection (after a rollback)."""
        with storage_errors("load topics"):
            return self.load_topics(self._writer)

    def insert_topic(self, name: str) -> TopicState:
        """Create a topic, or bring back a deleted one with its offsets going on."""
        now = int(time.time())
        topic_id, next_offset = self._writer.execute(
            "INSERT INTO topics (name, created_at) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET deleted = 0, created_at = excluded.created_at"
            " RETURNING id, next_offset", (name, now)).fetchall()[0]
        return TopicState(topic_id, name, next_offset, earliest=None, stored_bytes=0, created_at=now)

    def delete_topic(self, topic: TopicState) -> None:
        """Delete the topic's messages and hide it; its next_offset is kept."""
        self._writer.execute("DELETE FROM messages WHERE topic_id = ?", (topic.id,))
        self._writer.execute("UPDATE topics SET deleted = 1, stored_bytes = 0 WHERE id = ?",
                             (topic.id,))
        topic.deleted = True
        topic.earliest = None
        topic.stored_bytes = 0

    def append(self, topic: TopicState, payloads: Iterable[bytes]) -> int:
        """Append payloads at topic.next_offset onwards and advance topic's counters in
        memory (save_counters stores them). Returns the count."""
        first = topic.next_offset
        rows = [(topic.id, first + i, payload) for i, payload in enumerate(payloads)]
        if not rows:
            return 0
        self._writer.executemany(
            "INSERT INTO messages (topic_id, msg_offset, payload) VALUES (?, ?, ?)", rows)
        added = sum(len(row[2]) for row in rows)
        topic.next_offset = first + len(rows)
        topic.stored_bytes += added
        if topic.earliest is None:
            topic.earliest = first
        return len(rows)

    def save_counters(self, topics: Iterable[TopicState]) -> None:
        """Store the counters of topics changed in this transaction (once per commit,
        not once per append)."""
        self._writer.executemany(
            "UPDATE topics SET next_offset = ?, stored_bytes = ? WHERE id = ?",
            [(t.next_offset, t.stored_bytes, t.id) for t in topics])

    def trim(self, topic: TopicState, until: int) -> int:
        """Delete every message with offset <= until (counters: as for append).
        Returns how many were deleted."""
        if topic.earliest is None or until < topic.earliest:
            return 0
        freed, count = self._writer.execute(
            "SELECT coalesce(sum(length(payload)), 0), count(*) FROM messages"
            " WHERE topic_id = ? AND msg_offset <= ?", (topic.id, until)).fetchall()[0]
        self._writer.execute(
            "DELETE FROM messages WHERE topic_id = ? AND msg_offset <= ?", (topic.id, until))
        topic.stored_bytes -= freed
        topic.earliest = None if until >= topic.next_offset - 1 else until + 1
        return count

    def give_back_space(self, max_pages: int = 2048) -> int:
        """Return up to max_pages free pages to the filesystem (outside a transaction).
        Returns how many free pages are left for next time."""
        with storage_errors("incremental vacuum"):
            # Each step of this pragma frees one page; fetching runs it to the end.
            self._writer.execute(f"PRAGMA incremental_vacuum({int(max_pages)})").fetchall()
            return self._writer.pragma("freelist_count")


def _open_hint(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK):
        return f"directory {directory!r} is not writable"
    return "check the path and its permissions"
