"""The durable log: topics and their messages in one SQLite file, through apsw.

Writes go through one connection, used only by the writer thread (writer.py),
inside `write_transaction()`. Reads use a small pool of other connections; in WAL
mode they never wait for the writer and always see whole commits.

Offsets are never reused: each topic row keeps `next_offset`, advanced by every
append and left alone by trims, so a topic trimmed empty (or a restart) goes on
from where it was. Topic names only ever reach SQL as bound parameters.

apsw errors are translated into the SMQ error tree by `storage_errors` (schema.py)
and nowhere else. The consumers table's methods are in consumer_offsets.py, the disk
budget's measure in disk_space.py (mixins of Storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import apsw

from ..domain import TopicPolicy
from ..errors import StorageFailure
from . import batches
from .clock import ClockState
from .consumer_offsets import ConsumerOffsets
from .disk_space import DiskSpace
from .schema import SQLITE_HEADER, DatabaseFile, StorageOptions, storage_errors

log = logging.getLogger(__name__)

# The policy columns of a topic row, cleared when the topic is deleted.
FORGET_POLICY = (
    "max_messages = NULL, max_bytes = NULL, max_age = NULL, on_full = NULL, keep_uncommitted = NULL"
)


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
    policy: TopicPolicy = dataclasses.field(default_factory=lambda: TopicPolicy())
    last_mark: int = 0  # unix second of the newest time mark
    min_committed: int | None = None  # lowest offset committed by a named consumer
    consumer_count: int | None = None  # named consumers; None: not counted yet (writer's own)

    def snapshot(self) -> TopicState:
        """A copy, for readers, of what the writer goes on changing (quicker than copy.copy)."""
        copied = object.__new__(TopicState)
        copied.__dict__.update(self.__dict__)
        return copied

    @property
    def latest(self) -> int | None:
        """Highest stored offset, or None when the topic is empty."""
        return None if self.earliest is None else self.next_offset - 1

    @property
    def message_count(self) -> int:
        # Offsets are contiguous: trims only ever remove a prefix.
        return 0 if self.earliest is None else self.next_offset - self.earliest


class Storage(ConsumerOffsets, DiskSpace):
    """The SQLite log. Write methods run only inside write_transaction()."""

    def __init__(self, path: str, options: StorageOptions = StorageOptions()) -> None:
        self.path = path
        self.options = options
        self._file = DatabaseFile(path, options)
        self._writer = self._file.writer
        self.page_size = self._file.page_size
        self.trim_step = self._file.trim_step
        self._readers: queue.LifoQueue[apsw.Connection] = queue.LifoQueue()
        for _ in range(options.readers):
            self._readers.put(self._file.connect(apsw.SQLITE_OPEN_READWRITE, query_only=True))

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close every connection."""
        while not self._readers.empty():
            self._readers.get_nowait().close()
        self._file.close()

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
        """Every topic with its counters and policy, as committed."""
        sql = """SELECT id, name, next_offset, stored_bytes, created_at,
                        max_messages, max_bytes, max_age, on_full, keep_uncommitted,
                        (SELECT min(first_offset) FROM batches WHERE topic_id = topics.id),
                        (SELECT max(marked_at) FROM time_marks WHERE topic_id = topics.id),
                        (SELECT min(committed_offset) FROM consumers WHERE topic_id = topics.id)
                 FROM topics WHERE NOT deleted"""
        rows: list[Any]  # SQLite values, as the columns above hold them
        if conn is not None:
            rows = cast(Any, conn.execute(sql).fetchall())
        else:
            with self._reader("load topics") as reader:
                rows = cast(Any, reader.execute(sql).fetchall())
        topics = {}
        for (
            tid,
            name,
            next_offset,
            stored_bytes,
            created_at,
            *policy,
            earliest,
            last_mark,
            min_committed,
        ) in rows:
            if policy[4] is not None:
                policy[4] = bool(policy[4])
            topics[name] = TopicState(
                tid,
                name,
                next_offset,
                earliest,
                stored_bytes,
                created_at,
                policy=TopicPolicy(*policy),
                last_mark=last_mark or 0,
                min_committed=min_committed,
            )
        return topics

    def read_one(self, topic_id: int, offset: int) -> bytes | None:
        """The payload at offset, or None if it is not stored."""
        with self._reader("read message") as conn:
            row = cast(
                "batches.Row | None",
                conn.execute(
                    "SELECT first_offset, last_offset, payloads, sizes FROM batches"
                    " WHERE topic_id = ? AND first_offset <= ? ORDER BY first_offset DESC LIMIT 1",
                    (topic_id, offset),
                ).fetchone(),
            )
        return None if row is None else batches.message(*row, offset)

    def read_page(
        self, topic_id: int, from_offset: int, max_count: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Stored messages with offset >= from_offset, ascending, at most max_count of them,
        stopping before max_bytes is passed (but always at least one message)."""
        page: list[tuple[int, bytes]] = []
        size = 0
        with self._reader("read messages") as conn:
            # From the row holding from_offset (if stored) onwards.
            cursor = conn.execute(
                "SELECT first_offset, last_offset, payloads, sizes FROM batches"
                " WHERE topic_id = ?1 AND first_offset >= coalesce((SELECT first_offset"
                "   FROM batches WHERE topic_id = ?1 AND first_offset <= ?2"
                "   ORDER BY first_offset DESC LIMIT 1), ?2)"
                " ORDER BY first_offset",
                (topic_id, from_offset),
            )
            for message in itertools.chain.from_iterable(
                batches.unpack(*cast(batches.Row, row), from_offset) for row in cursor
            ):
                size += len(message[1])
                if page and size > max_bytes:
                    break
                page.append(message)
                if len(page) >= max_count:
                    break
            cursor.close()
        return page

    def check_readable(self) -> None:
        """For liveness checks: the file at `path` is still the one opened (not moved,
        deleted or mounted over: what is written now would be lost at the next start),
        its header reads from the filesystem itself (SQLite answers from its cache, so a
        filesystem that shut itself down after I/O errors fails only here), and a query
        answers through the pool. Raises StorageFailure saying which failed."""
        where = f"database {self.path!r}"
        try:
            opened, there = os.fstat(self._file.lock_fd), os.stat(self.path)
            header = os.pread(self._file.lock_fd, len(SQLITE_HEADER), 0)
        except OSError as exc:
            raise StorageFailure(f"{where}: {exc.strerror}") from None
        if (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino):
            raise StorageFailure(
                f"{where} is not the file this server opened any more "
                "(moved, deleted or mounted over)"
            )
        if header != SQLITE_HEADER:
            raise StorageFailure(f"{where} no longer starts with an SQLite header")
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

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[Callable[[], object]]:
        """A savepoint inside the write transaction: the block may call what it yields to
        undo everything since. (If the block raises, the transaction's rollback ends it.)"""
        self._writer.execute("SAVEPOINT part")
        yield lambda: self._writer.execute("ROLLBACK TO part")
        self._writer.execute("RELEASE part")

    def reload_topics(self) -> dict[str, TopicState]:
        """Topic counters as committed, read on the writer connection (after a rollback)."""
        with storage_errors("load topics"):
            return self.load_topics(self._writer)

    def insert_topic(self, name: str) -> TopicState:
        """Create a topic, or bring back a deleted one with its offsets going on (and
        nothing else of it: files of older SMQs may still hold its policy)."""
        now = int(time.time())
        topic_id, next_offset = cast(
            Any,
            self._writer.execute(
                "INSERT INTO topics (name, created_at) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET deleted = 0, created_at = excluded.created_at,"
                f" stored_bytes = 0, {FORGET_POLICY} RETURNING id, next_offset",
                (name, now),
            ).fetchall()[0],
        )
        return TopicState(
            topic_id, name, next_offset, earliest=None, stored_bytes=0, created_at=now
        )

    def delete_topic(self, topic: TopicState) -> None:
        """Delete the topic's messages, consumers and policy, and hide it; only its
        next_offset is kept (offsets are never reused)."""
        self._writer.execute("DELETE FROM batches WHERE topic_id = ?", (topic.id,))
        self._writer.execute("DELETE FROM time_marks WHERE topic_id = ?", (topic.id,))
        self._writer.execute("DELETE FROM consumers WHERE topic_id = ?", (topic.id,))
        topic.min_committed = None
        # next_offset too: appends earlier in this transaction advanced it in memory only,
        # and a topic created again under this name goes on from it.
        self._writer.execute(
            "UPDATE topics SET deleted = 1, stored_bytes = 0, next_offset = ?,"
            f" {FORGET_POLICY} WHERE id = ?",
            (topic.next_offset, topic.id),
        )
        topic.deleted = True
        topic.earliest = None
        topic.stored_bytes = 0

    def append(
        self,
        topic: TopicState,
        payloads: Sequence[bytes],
        size: int | None = None,
        now: int | None = None,
    ) -> int:
        """Append payloads at topic.next_offset onwards and advance topic's counters in
        memory (save_counters stores them). `size`: their total length, if known; `now`:
        the unix second they are written at (default: the wall clock). Returns the count."""
        first = topic.next_offset
        if not payloads:
            return 0
        added = sum(map(len, payloads)) if size is None else size
        self._insert_rows(topic, batches.pack(first, payloads, added))
        now = max(int(time.time()) if now is None else now, topic.last_mark)  # never back
        if now != topic.last_mark:
            self._writer.execute(
                "INSERT OR REPLACE INTO time_marks (topic_id, first_offset, marked_at)"
                " VALUES (?, ?, ?)",
                (topic.id, first, now),
            )
            topic.last_mark = now
        topic.next_offset = first + len(payloads)
        topic.stored_bytes += added
        if topic.earliest is None:
            topic.earliest = first
        return len(payloads)

    def _insert_rows(self, topic: TopicState, rows: list[batches.Row]) -> None:
        sql = (
            "INSERT INTO batches (topic_id, first_offset, last_offset, payloads, sizes)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        if len(rows) == 1:
            self._writer.execute(sql, (topic.id, *rows[0]))
        else:
            self._writer.executemany(sql, [(topic.id, *row) for row in rows])

    def save_counters(self, topics: Iterable[TopicState]) -> None:
        """Store the counters of topics changed in this transaction (once per commit,
        not once per append)."""
        self._writer.executemany(
            "UPDATE topics SET next_offset = ?, stored_bytes = ? WHERE id = ?",
            [(t.next_offset, t.stored_bytes, t.id) for t in topics],
        )

    def trim(self, topic: TopicState, until: int) -> int:
        """Delete every message with offset <= until (counters: as for append).
        Returns how many were deleted."""
        if topic.earliest is None or until < topic.earliest:
            return 0
        until = min(until, topic.next_offset - 1)  # also keeps until + 1 within int64
        whole = "topic_id = ? AND first_offset <= ? AND last_offset <= ?"
        freed, count = cast(
            Any,
            self._writer.execute(
                "SELECT coalesce(sum(length(payloads)), 0),"
                " coalesce(sum(last_offset - first_offset + 1), 0)"
                f" FROM batches WHERE {whole}",
                (topic.id, until, until),
            ).fetchall()[0],
        )
        self._writer.execute(f"DELETE FROM batches WHERE {whole}", (topic.id, until, until))
        split = cast(
            list[batches.Row],
            self._writer.execute(
                "DELETE FROM batches WHERE topic_id = ? AND first_offset <= ?"
                " RETURNING first_offset, last_offset, payloads, sizes",
                (topic.id, until),
            ).fetchall(),
        )
        if split:  # the row holding until and later messages: store those again
            kept = [payload for _, payload in batches.unpack(*split[0], until + 1)]
            kept_bytes = sum(map(len, kept))
            freed += len(split[0][2]) - kept_bytes
            count += until - split[0][0] + 1
            self._insert_rows(topic, batches.pack(until + 1, kept, kept_bytes))
        self._trim_time_marks(topic, until)
        topic.stored_bytes -= freed
        topic.earliest = None if until >= topic.next_offset - 1 else until + 1
        return count

    def _trim_time_marks(self, topic: TopicState, until: int) -> None:
        """Drop the marks of trimmed messages; the first message left keeps its time."""
        row = self._writer.execute(
            "SELECT marked_at FROM time_marks WHERE topic_id = ? AND first_offset <= ?"
            " ORDER BY first_offset DESC LIMIT 1",
            (topic.id, until + 1),
        ).fetchone()
        self._writer.execute(
            "DELETE FROM time_marks WHERE topic_id = ? AND first_offset <= ?", (topic.id, until)
        )
        if row is not None and until + 1 < topic.next_offset:
            self._writer.execute(
                "INSERT OR IGNORE INTO time_marks (topic_id, first_offset, marked_at)"
                " VALUES (?, ?, ?)",
                (topic.id, until + 1, row[0]),
            )

    def clock_state(self) -> ClockState:
        """Message time's offset as last saved (writer thread)."""
        values = dict(
            self._writer.execute(
                "SELECT key, value FROM meta"
                " WHERE key IN ('clock_offset', 'boot_id', 'wall_minus_boot')"
            )
        )
        return ClockState(
            int(values.get("clock_offset", 0)),
            str(values.get("boot_id", "")),
            float(values.get("wall_minus_boot", 0.0)),
        )

    def save_clock_state(self, state: ClockState) -> None:
        self._writer.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (
                ("clock_offset", state.offset),
                ("boot_id", state.boot_id),
                ("wall_minus_boot", state.wall_minus_boot),
            ),
        )

    def offset_older_than(self, topic: TopicState, cutoff: int) -> int:
        """The last offset written before unix second `cutoff` (0 if none)."""
        row = self._writer.execute(
            "SELECT first_offset FROM time_marks WHERE topic_id = ? AND marked_at >= ?"
            " ORDER BY first_offset LIMIT 1",
            (topic.id, cutoff),
        ).fetchone()
        return (row[0] if row is not None else topic.next_offset) - 1

    def offset_freeing(self, topic: TopicState, excess: int) -> int:
        """The smallest offset such that trimming up to it frees at least `excess` bytes.
        Reads only the rows it would trim."""
        freed = 0
        offset = 0
        for first, last, size, sizes in self._writer.execute(
            "SELECT first_offset, last_offset, length(payloads), sizes FROM batches"
            " WHERE topic_id = ? ORDER BY first_offset",
            (topic.id,),
        ):
            if freed + size < excess:
                freed, offset = freed + size, last
                continue
            for offset, length in zip(
                itertools.count(first), batches.lengths(first, last, sizes, size)
            ):
                freed += length
                if freed >= excess:
                    return offset
        return offset

    def set_policy(self, topic: TopicState, policy: TopicPolicy) -> None:
        self._writer.execute(
            "UPDATE topics SET max_messages = ?, max_bytes = ?, max_age = ?, on_full = ?,"
            " keep_uncommitted = ? WHERE id = ?",
            (*dataclasses.astuple(policy), topic.id),
        )
        topic.policy = policy


def stored_messages(conn: apsw.Connection) -> list[tuple[str, int, bytes]]:
    """Every stored (topic name, offset, payload), by topic and offset: for looking into
    a database file (tests, forensics) without a server."""
    rows: list[Any] = conn.execute(
        "SELECT t.name, b.first_offset, b.last_offset, b.payloads, b.sizes"
        " FROM batches b JOIN topics t ON t.id = b.topic_id"
        " ORDER BY b.topic_id, b.first_offset"
    ).fetchall()
    return [
        (name, offset, payload) for name, *row in rows for offset, payload in batches.unpack(*row)
    ]
