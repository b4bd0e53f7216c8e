"""The durable log: topics and their messages in one SQLite file, through apsw.

Writes go through one connection, used only by the writer thread (writer.py),
inside `write_transaction()`. Reads use a small pool of other connections; in WAL
mode they never wait for the writer and always see whole commits.

Messages are rows of `message_rows`, keyed by one integer: the topic's slot and the
row's first offset (formats.key_base), so that appending to a topic touches only the
last page of its range of the table.

Offsets are never reused: each topic row keeps `next_offset`, so a topic trimmed empty
(or a restart) goes on from where it was. To keep a commit to as few pages as possible
(flash wear, docs/flash-wear.md), appends do not write the topic row: its `next_offset`
and `stored_bytes` are saved by trims, deletes and the writer's periodic upkeep, and
loading adds what the rows appended after the last save hold (`_recover_counters`).
Topic names only ever reach SQL as bound parameters.

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
from ..errors import ResourceExhausted, StorageFailure
from . import batches
from .clock import ClockState
from .consumer_offsets import ConsumerOffsets
from .disk_space import DiskSpace
from .formats import MAX_OFFSET, SLOTS, key_base, key_range
from .schema import (
    SQLITE_HEADER,
    DatabaseFile,
    StorageOptions,
    storage_errors,
)
from .topic_state import TopicState, committed_topics

log = logging.getLogger(__name__)

# The policy columns of a topic row, cleared when the topic is deleted.
FORGET_POLICY = (
    "max_messages = NULL, max_bytes = NULL, max_age = NULL, on_full = NULL, keep_uncommitted = NULL"
)


class Storage(ConsumerOffsets, DiskSpace):
    """The SQLite log. Write methods run only inside write_transaction()."""

    def __init__(self, path: str, options: StorageOptions = StorageOptions()) -> None:
        self.path = path
        self.options = options
        self._file = DatabaseFile(path, options)
        self._writer = self._file.writer
        self.page_size = self._file.page_size
        self.trim_step = self._file.trim_step
        self.commit_seconds = 0.0  # how long the last COMMIT statement took (its fsync, if any)
        self.commit_wrote = False  # whether its transaction changed a row (else no fsync to time)
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
        if conn is not None:
            return committed_topics(conn)
        with self._reader("load topics") as reader:
            return committed_topics(reader)

    def read_one(self, key_base: int, offset: int) -> bytes | None:
        """The payload at offset of the topic whose rows start at key_base, or None if
        it is not stored."""
        with self._reader("read message") as conn:
            row = cast(
                "batches.Row | None",
                conn.execute(
                    "SELECT key - ?1, last_offset, payloads, sizes FROM message_rows"
                    " WHERE key BETWEEN ?1 AND ?1 + ?2 ORDER BY key DESC LIMIT 1",
                    (key_base, offset),
                ).fetchone(),
            )
        return None if row is None else batches.message(*row, offset)

    def read_page(
        self, key_base: int, from_offset: int, max_count: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Stored messages of the topic whose rows start at key_base with offset >=
        from_offset, ascending, at most max_count of them, stopping before max_bytes is
        passed (but always at least one message)."""
        page: list[tuple[int, bytes]] = []
        size = 0
        with self._reader("read messages") as conn:
            # From the row holding from_offset (if stored) onwards.
            cursor = conn.execute(
                "SELECT key - ?1, last_offset, payloads, sizes FROM message_rows"
                " WHERE key BETWEEN coalesce((SELECT key FROM message_rows"
                "   WHERE key BETWEEN ?1 AND ?1 + ?2 ORDER BY key DESC LIMIT 1), ?1 + ?2)"
                " AND ?1 + ?3 ORDER BY key",
                (key_base, max(from_offset, 0), MAX_OFFSET),
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
            changes = self._writer.total_changes()
            try:
                yield
            except BaseException:
                with contextlib.suppress(apsw.Error):
                    self._writer.execute("ROLLBACK")
                raise
            try:
                started = time.perf_counter()
                self._writer.execute("COMMIT")
                self.commit_seconds = time.perf_counter() - started
                self.commit_wrote = self._writer.total_changes() != changes
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
        slot = self._free_slot()
        topic_id, next_offset = cast(
            Any,
            self._writer.execute(
                "INSERT INTO topics (name, created_at, slot) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET deleted = 0, created_at = excluded.created_at,"
                f" stored_bytes = 0, slot = excluded.slot, {FORGET_POLICY}"
                " RETURNING id, next_offset",
                (name, now, slot),
            ).fetchall()[0],
        )
        return TopicState(
            topic_id,
            name,
            next_offset,
            earliest=None,
            stored_bytes=0,
            created_at=now,
            saved=(next_offset, 0),
            key_base=key_base(slot),
        )

    def _free_slot(self) -> int:
        """A slot no live topic holds: the one after the last given, so that a slot freed
        by a deletion is given again only after all the others (a reader still holding
        the deleted topic's keys finds nothing rather than another topic's messages)."""
        start = int(self._writer.execute("SELECT value FROM meta WHERE key = 'next_slot'").get or 0)
        slot = start % SLOTS
        while self._writer.execute("SELECT 1 FROM topics WHERE slot = ?", (slot,)).get:
            slot = (slot + 1) % SLOTS
            if slot == start % SLOTS:
                raise ResourceExhausted(f"the server holds {SLOTS} topics, the most it can")
        self._writer.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_slot', ?)", (slot + 1,)
        )
        return slot

    def delete_topic(self, topic: TopicState) -> None:
        """Delete the topic's messages, consumers and policy, and hide it; only its
        next_offset is kept (offsets are never reused)."""
        self._writer.execute(
            "DELETE FROM message_rows WHERE key BETWEEN ? AND ?", key_range(topic.key_base)
        )
        self._writer.execute("DELETE FROM time_marks WHERE topic_id = ?", (topic.id,))
        self._writer.execute("DELETE FROM consumers WHERE topic_id = ?", (topic.id,))
        topic.min_committed = None
        # next_offset too: appends earlier in this transaction advanced it in memory only,
        # and a topic created again under this name goes on from it.
        self._writer.execute(
            "UPDATE topics SET deleted = 1, stored_bytes = 0, next_offset = ?, slot = NULL,"
            f" {FORGET_POLICY} WHERE id = ?",
            (topic.next_offset, topic.id),
        )
        topic.deleted = True
        topic.earliest = None
        topic.stored_bytes = 0
        topic.saved = (topic.next_offset, 0)

    def append(
        self,
        topic: TopicState,
        payloads: Sequence[bytes],
        size: int | None = None,
        now: int | None = None,
    ) -> int:
        """Append payloads at topic.next_offset onwards and advance topic's counters in
        memory (saved later: see the module's docstring). `size`: their total length, if
        known; `now`: the unix second they are written at (default: the wall clock).
        Returns the count."""
        first = topic.next_offset
        if not payloads:
            return 0
        if first + len(payloads) - 1 > MAX_OFFSET:
            raise ResourceExhausted(
                f"topic {topic.name!r} has reached offset {MAX_OFFSET}, the highest SMQ stores"
            )
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
        sql = "INSERT INTO message_rows (key, last_offset, payloads, sizes) VALUES (?, ?, ?, ?)"
        base = topic.key_base
        if len(rows) == 1:
            first, *rest = rows[0]
            self._writer.execute(sql, (base + first, *rest))
        else:
            self._writer.executemany(sql, [(base + first, *rest) for first, *rest in rows])

    def save_counters(self, topics: Iterable[TopicState], every_change: bool = False) -> None:
        """Store the counters of those topics that a trim changed in this transaction,
        or (every_change) of all whose counters changed since they were last saved."""
        due = [t for t in topics if t.must_save or (every_change and t.unsaved)]
        self._writer.executemany(
            "UPDATE topics SET next_offset = ?, stored_bytes = ? WHERE id = ?",
            [(t.next_offset, t.stored_bytes, t.id) for t in due],
        )
        for topic in due:
            topic.saved = (topic.next_offset, topic.stored_bytes)
            topic.must_save = False

    def trim(self, topic: TopicState, until: int) -> int:
        """Delete every message with offset <= until (counters: as for append).
        Returns how many were deleted."""
        if topic.earliest is None or until < topic.earliest:
            return 0
        until = min(until, topic.next_offset - 1)  # also keeps until + 1 within int64
        # the topic's rows that start at or before `until` and those that also end there
        rows = "key BETWEEN ?1 AND ?1 + ?2"
        whole = f"{rows} AND last_offset <= ?2"
        freed, count = cast(
            Any,
            self._writer.execute(
                "SELECT coalesce(sum(length(payloads)), 0),"
                " coalesce(sum(last_offset - (key - ?1) + 1), 0)"
                f" FROM message_rows WHERE {whole}",
                (topic.key_base, until),
            ).fetchall()[0],
        )
        self._writer.execute(f"DELETE FROM message_rows WHERE {whole}", (topic.key_base, until))
        split = cast(
            list[batches.Row],
            self._writer.execute(
                f"DELETE FROM message_rows WHERE {rows}"
                " RETURNING key - ?1, last_offset, payloads, sizes",
                (topic.key_base, until),
            ).fetchall(),
        )
        if split:  # the row holding until and later messages: store those again
            kept = [payload for _, payload in batches.unpack(*split[0], until + 1)]
            kept_bytes = sum(map(len, kept))
            freed += len(split[0][2]) - kept_bytes
            count += until - split[0][0] + 1
            self._insert_rows(topic, batches.pack(until + 1, kept, kept_bytes))
        self._trim_time_marks(topic, until)
        topic.must_save = True  # rows below the saved next_offset changed
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
            "SELECT key - ?1, last_offset, length(payloads), sizes FROM message_rows"
            " WHERE key BETWEEN ?1 AND ?2 ORDER BY key",
            key_range(topic.key_base),
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
