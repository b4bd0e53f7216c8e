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
import ctypes
import dataclasses
import fcntl
import itertools
import logging
import operator
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import apsw

from . import batches
from .clock import ClockState
from .errors import StartupError, StorageFailure, StorageFull, SMQError

log = logging.getLogger(__name__)

# Format of the database file, kept in PRAGMA user_version. Raise it with a
# migration in MIGRATIONS whenever the schema changes; an older SMQ refuses a newer file.
SCHEMA_VERSION = 3
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE topics (
               id           INTEGER PRIMARY KEY,
               name         TEXT NOT NULL UNIQUE,
               next_offset  INTEGER NOT NULL DEFAULT 1,  -- never goes back: offsets are not reused
               stored_bytes INTEGER NOT NULL DEFAULT 0,  -- sum of payload sizes still stored
               created_at   INTEGER NOT NULL,            -- unix seconds
               deleted      INTEGER NOT NULL DEFAULT 0,  -- kept so a re-created topic goes on
               -- per-topic overrides of the server's defaults; NULL: use the default
               max_messages INTEGER,
               max_bytes    INTEGER,
               max_age      INTEGER,                     -- seconds
               on_full      TEXT,                        -- 'reject' or 'drop-oldest'
               keep_uncommitted INTEGER                  -- retention spares uncommitted messages
           )""",
        """CREATE TABLE messages (
               topic_id   INTEGER NOT NULL,
               msg_offset INTEGER NOT NULL,
               payload    BLOB NOT NULL,
               PRIMARY KEY (topic_id, msg_offset)
           )""",
        # When messages were written, coarsely: one row per topic per second of writing
        # at most, (first offset written in that second, unix second). Age retention
        # reads it instead of a timestamp per message.
        """CREATE TABLE time_marks (
               topic_id     INTEGER NOT NULL,
               first_offset INTEGER NOT NULL,
               marked_at    INTEGER NOT NULL,
               PRIMARY KEY (topic_id, first_offset)
           ) WITHOUT ROWID""",
        # Durable named consumers: the last offset each has processed, per topic.
        """CREATE TABLE consumers (
               name             TEXT NOT NULL,
               topic_id         INTEGER NOT NULL,
               committed_offset INTEGER NOT NULL,
               updated_at       INTEGER NOT NULL,
               PRIMARY KEY (name, topic_id)
           ) WITHOUT ROWID""",
        "CREATE INDEX consumers_by_topic ON consumers (topic_id, committed_offset)",
    ),
    # Consecutive messages share a row (batches.py): a batch is one row, not one per message.
    2: (
        """CREATE TABLE batches (
               topic_id     INTEGER NOT NULL,
               first_offset INTEGER NOT NULL,
               last_offset  INTEGER NOT NULL,
               payloads     BLOB NOT NULL,  -- the payloads, one after the other
               sizes        BLOB,           -- their lengths (uint32 LE); NULL for one message
               PRIMARY KEY (topic_id, first_offset)
           )""",
        """INSERT INTO batches (topic_id, first_offset, last_offset, payloads, sizes)
           SELECT topic_id, msg_offset, msg_offset, payload, NULL FROM messages""",
        "DROP TABLE messages",
    ),
    # Small facts about the database as a whole, such as message time's offset (clock.py).
    3: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
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
SQLITE_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
MIN_DATABASE_BYTES = 512  # SQLite's smallest page: a database is at least one page
WAL_SIZE_LIMIT = 64 * 1024**2  # truncate the WAL back to this after checkpoints
# The disk budget is --max-db-size, or else the filesystem's size. Writes stop this
# far before it, so that trims and deletes, which need room in the WAL, still work at
# a full budget: a sixteenth of the budget, within these bounds.
DELETE_RESERVE_MIN = 64 * 1024
DELETE_RESERVE_MAX = 8 * 1024**2
# The WAL counts in the budget: it is checkpointed and truncated to its share, an
# eighth of the budget within these bounds, and that much is set aside for it.
WAL_SHARE_MIN = 64 * 1024
DEFAULT_AUTOCHECKPOINT_PAGES = 1000  # SQLite's; small budgets checkpoint more often
# The policy columns of a topic row, cleared when the topic is deleted.
FORGET_POLICY = ("max_messages = NULL, max_bytes = NULL, max_age = NULL, on_full = NULL,"
                 " keep_uncommitted = NULL")


ON_FULL_POLICIES = ("reject", "drop-oldest")


@dataclasses.dataclass(frozen=True)
class TopicPolicy:
    """Retention and disk-full behaviour of a topic. None: the server's default.
    0 for a limit means no limit."""
    max_messages: int | None = None
    max_bytes: int | None = None
    max_age: int | None = None  # seconds
    on_full: str | None = None  # 'reject' or 'drop-oldest'
    keep_uncommitted: bool | None = None  # retention spares what named consumers lack

    def over(self, defaults: TopicPolicy) -> TopicPolicy:
        """This policy with its unset fields taken from defaults."""
        # Not dataclasses.astuple: it deep-copies every field, and this runs at each commit.
        return TopicPolicy(*(mine if mine is not None else theirs for mine, theirs in
                             zip(_policy_values(self), _policy_values(defaults))))


_policy_values = operator.attrgetter(*(f.name for f in dataclasses.fields(TopicPolicy)))


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


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    durability: str = "full"     # a key of DURABILITY_PRAGMAS
    readers: int = 4             # read connections in the pool
    startup_check: str = "quick"  # 'quick': PRAGMA quick_check on open; 'off'
    on_corrupt: str = "refuse"   # 'refuse' or 'move-aside' (rename it, start fresh)
    max_db_size: int = 0         # bytes; 0: no limit (SQLite's max_page_count enforces it)
    min_free_space: int = 0      # bytes that must stay free on the filesystem


class DamagedDatabase(StartupError):
    """The file is not SQLite, or SQLite finds it damaged."""


class Storage:
    """The SQLite log. Write methods run only inside write_transaction()."""

    def __init__(self, path: str, options: StorageOptions = StorageOptions()) -> None:
        self.path = path
        self.options = options
        self._directory = os.path.dirname(os.path.abspath(path))  # for free_space()
        existed = os.path.exists(path)  # before _lock_database creates it
        self._lock_fd = self._lock_database()
        budget = options.max_db_size or _filesystem_size(self._directory)
        self._reserve = min(max(budget // 16, DELETE_RESERVE_MIN), DELETE_RESERVE_MAX)
        self.trim_step = self._reserve // 4  # payload bytes a large trim deletes per transaction
        self._wal_share = min(max(budget // 8, WAL_SHARE_MIN), WAL_SIZE_LIMIT)
        found = {suffix: os.path.exists(path + suffix) for suffix in ("", "-wal", "-shm")}
        found[""] = existed
        try:
            self._writer = self._open_writer(existed)
        except DamagedDatabase as exc:
            if options.on_corrupt != "move-aside":
                self._leave_as_found(found)
                raise
            moved = self._move_aside()
            log.error("DATABASE DAMAGED: %s; moved it to %s and starting with an EMPTY "
                      "database (--on-corrupt=move-aside)", exc, moved)
            self._unlock_database()
            self._lock_fd = self._lock_database()
            self._writer = self._open_writer(existed=False)
        except BaseException:
            self._leave_as_found(found)
            raise
        self.page_size = self._writer.pragma("page_size")
        self._readers: queue.LifoQueue[apsw.Connection] = queue.LifoQueue()
        for _ in range(options.readers):
            self._readers.put(self._connect(apsw.SQLITE_OPEN_READWRITE, query_only=True))

    # -- setting up -----------------------------------------------------------

    def _connect(self, flags: int, query_only: bool = False) -> apsw.Connection:
        conn = apsw.Connection(self.path, flags=flags)
        conn.setbusytimeout(BUSY_TIMEOUT_MS)
        _keep_wal_files(conn)
        if query_only:
            conn.pragma("query_only", True)
        return conn

    def _open_writer(self, existed: bool) -> apsw.Connection:
        """Open (creating if needed), check and migrate the database; refuse files that
        are not ours, newer than us, damaged or truncated."""
        where = f"database {self.path!r}"
        self._refuse_truncated(existed)
        conn = None
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
            conn.pragma("synchronous", DURABILITY_PRAGMAS[self.options.durability])
            conn.pragma("journal_size_limit", self._wal_share)
            conn.pragma("wal_autocheckpoint", min(self._wal_share // 2 // conn.pragma("page_size"),
                                                  DEFAULT_AUTOCHECKPOINT_PAGES))
            if self.options.startup_check == "quick":
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise DamagedDatabase(f"{where} is damaged: {_one_line(problems)}")
            self._migrate(conn, version)
            if self.options.max_db_size:
                # SQLite's own hard limit: the budget less the WAL's share. SMQ's writes
                # stop a reserve earlier (free_space), which trims and deletes may use.
                pages = (self.options.max_db_size - self._wal_share) // conn.pragma("page_size")
                conn.pragma("max_page_count", max(pages, 16))
            return conn
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StartupError) or not isinstance(exc, apsw.Error):
                raise
            raise _startup_error(where, self.path, exc) from None

    def _refuse_truncated(self, existed: bool) -> None:
        """Refuse a database file that lost its content: SQLite would start an empty
        database in a file shorter than a page (offsets from 1 again) and drop what the
        WAL holds. SMQ keeps the -wal and -shm files beside its database even after a
        clean stop, so such a file with either beside it once held a database; a
        zero-length file alone (`touch`) is a new one, a few bytes alone are not SMQ's."""
        wal, shm = self.path + "-wal", self.path + "-shm"
        wal_bytes = os.path.getsize(wal) if os.path.exists(wal) else 0
        where = f"database {self.path!r}"
        advice = ("restore it from a backup, or start with --on-corrupt move-aside to move "
                  "these files aside and start with an empty database")
        if not existed:
            if wal_bytes:
                raise DamagedDatabase(f"{where} is missing but its WAL {wal!r} holds {wal_bytes} "
                                      f"bytes of it: {advice}")
            return
        size = os.path.getsize(self.path)
        if size >= MIN_DATABASE_BYTES:
            return  # SQLite and quick_check judge the rest
        if size and not (os.path.exists(wal) or os.path.exists(shm)):
            raise DamagedDatabase(f"{where} is {size} bytes long, too short for an SQLite "
                                  f"database: {advice}")
        if os.path.exists(wal) or os.path.exists(shm):
            evidence = (f"its WAL holds {wal_bytes} bytes" if wal_bytes
                        else "the -wal/-shm files beside it show that it held one")
            raise DamagedDatabase(f"{where} is {size} bytes long but {evidence}: it was "
                                  f"truncated; {advice}")

    def _leave_as_found(self, found: dict[str, bool]) -> None:
        """After a refusal: remove the files that opening made (the empty database file
        of _lock_database, SQLite's -wal and -shm), then unlock. A refused database is
        left as it was, and the -wal/-shm made here cannot later pass for evidence that
        it held data (_refuse_truncated)."""
        for suffix, existed in found.items():
            if not existed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
        self._unlock_database()

    def _lock_database(self) -> int:
        """One SMQ per database file: an exclusive flock on the file, held until close().
        (flock is separate from SQLite's own fcntl locks; the descriptor is closed only
        after SQLite's connections, so closing it cannot drop their locks.)"""
        where = f"database {self.path!r}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except IsADirectoryError:
            raise StartupError(f"cannot open {where}: it is a directory") from None
        except OSError as exc:
            raise StartupError(f"cannot open {where}: {_open_hint(self.path)} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"{where} is in use by another SMQ server; "
                               "stop it or choose another --dbpath") from None
        return fd

    def _unlock_database(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _move_aside(self) -> str:
        """Rename the database (and its WAL and shared-memory files) out of the way."""
        target = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, target + suffix)
        return target

    def _migrate(self, conn: apsw.Connection, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            try:
                with conn:
                    for statement in MIGRATIONS[target]:
                        conn.execute(statement)
                    conn.pragma("user_version", target)
            except apsw.FullError:
                raise StartupError(
                    f"database {self.path!r}: no room to migrate it to format {target} (it is "
                    "copied once: needs free space of about twice its size); the file is "
                    "unchanged: free some space and start again") from None
            log.info("database format migrated to %d", target)
        if version and version < SCHEMA_VERSION:
            # Migrations copy tables: give the old ones' pages back to the disk now (or,
            # if even that finds no room, little by little later, as after trims).
            try:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
                conn.pragma("wal_checkpoint", "TRUNCATE")
            except apsw.FullError:
                log.warning("no room to give the old format's pages back yet")

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close every connection."""
        while not self._readers.empty():
            self._readers.get_nowait().close()
        with contextlib.suppress(apsw.Error):
            self._writer.pragma("wal_checkpoint", "TRUNCATE")
        self._writer.close()
        self._unlock_database()

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
        if conn is not None:
            rows = conn.execute(sql).fetchall()
        else:
            with self._reader("load topics") as reader:
                rows = reader.execute(sql).fetchall()
        topics = {}
        for (tid, name, next_offset, stored_bytes, created_at, *policy,
             earliest, last_mark, min_committed) in rows:
            if policy[4] is not None:
                policy[4] = bool(policy[4])
            topics[name] = TopicState(tid, name, next_offset, earliest, stored_bytes, created_at,
                                      policy=TopicPolicy(*policy), last_mark=last_mark or 0,
                                      min_committed=min_committed)
        return topics

    def read_one(self, topic_id: int, offset: int) -> bytes | None:
        """The payload at offset, or None if it is not stored."""
        with self._reader("read message") as conn:
            row = conn.execute(
                "SELECT first_offset, last_offset, payloads, sizes FROM batches"
                " WHERE topic_id = ? AND first_offset <= ? ORDER BY first_offset DESC LIMIT 1",
                (topic_id, offset)).fetchone()
        return None if row is None else batches.message(*row, offset)

    def read_page(self, topic_id: int, from_offset: int, max_count: int,
                  max_bytes: int) -> list[tuple[int, bytes]]:
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
                " ORDER BY first_offset", (topic_id, from_offset))
            for message in itertools.chain.from_iterable(
                    batches.unpack(*row, from_offset) for row in cursor):
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
            opened, there = os.fstat(self._lock_fd), os.stat(self.path)
            header = os.pread(self._lock_fd, len(SQLITE_HEADER), 0)
        except OSError as exc:
            raise StorageFailure(f"{where}: {exc.strerror}") from None
        if (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino):
            raise StorageFailure(f"{where} is not the file this server opened any more "
                                 "(moved, deleted or mounted over)")
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
    def savepoint(self) -> Iterator[Callable[[], None]]:
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
        topic_id, next_offset = self._writer.execute(
            "INSERT INTO topics (name, created_at) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET deleted = 0, created_at = excluded.created_at,"
            f" stored_bytes = 0, {FORGET_POLICY} RETURNING id, next_offset", (name, now)).fetchall()[0]
        return TopicState(topic_id, name, next_offset, earliest=None, stored_bytes=0, created_at=now)

    def delete_topic(self, topic: TopicState) -> None:
        """Delete the topic's messages, consumers and policy, and hide it; only its
        next_offset is kept (offsets are never reused)."""
        self._writer.execute("DELETE FROM batches WHERE topic_id = ?", (topic.id,))
        self._writer.execute("DELETE FROM time_marks WHERE topic_id = ?", (topic.id,))
        self._writer.execute("DELETE FROM consumers WHERE topic_id = ?", (topic.id,))
        topic.min_committed = None
        self._writer.execute(f"UPDATE topics SET deleted = 1, stored_bytes = 0, {FORGET_POLICY}"
                             " WHERE id = ?", (topic.id,))
        topic.deleted = True
        topic.earliest = None
        topic.stored_bytes = 0

    def append(self, topic: TopicState, payloads: Sequence[bytes], size: int | None = None,
               now: int | None = None) -> int:
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
                " VALUES (?, ?, ?)", (topic.id, first, now))
            topic.last_mark = now
        topic.next_offset = first + len(payloads)
        topic.stored_bytes += added
        if topic.earliest is None:
            topic.earliest = first
        return len(payloads)

    def _insert_rows(self, topic: TopicState, rows: list[batches.Row]) -> None:
        sql = ("INSERT INTO batches (topic_id, first_offset, last_offset, payloads, sizes)"
               " VALUES (?, ?, ?, ?, ?)")
        if len(rows) == 1:
            self._writer.execute(sql, (topic.id, *rows[0]))
        else:
            self._writer.executemany(sql, [(topic.id, *row) for row in rows])

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
        until = min(until, topic.next_offset - 1)  # also keeps until + 1 within int64
        whole = "topic_id = ? AND first_offset <= ? AND last_offset <= ?"
        freed, count = self._writer.execute(
            "SELECT coalesce(sum(length(payloads)), 0), coalesce(sum(last_offset - first_offset + 1), 0)"
            f" FROM batches WHERE {whole}", (topic.id, until, until)).fetchall()[0]
        self._writer.execute(f"DELETE FROM batches WHERE {whole}", (topic.id, until, until))
        split = self._writer.execute(
            "DELETE FROM batches WHERE topic_id = ? AND first_offset <= ?"
            " RETURNING first_offset, last_offset, payloads, sizes", (topic.id, until)).fetchall()
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
            " ORDER BY first_offset DESC LIMIT 1", (topic.id, until + 1)).fetchone()
        self._writer.execute("DELETE FROM time_marks WHERE topic_id = ? AND first_offset <= ?",
                             (topic.id, until))
        if row is not None and until + 1 < topic.next_offset:
            self._writer.execute(
                "INSERT OR IGNORE INTO time_marks (topic_id, first_offset, marked_at)"
                " VALUES (?, ?, ?)", (topic.id, until + 1, row[0]))

    def clock_state(self) -> ClockState:
        """Message time's offset as last saved (writer thread)."""
        values = dict(self._writer.execute(
            "SELECT key, value FROM meta WHERE key IN ('clock_offset', 'boot_id', 'wall_minus_boot')"))
        return ClockState(int(values.get("clock_offset", 0)), str(values.get("boot_id", "")),
                          float(values.get("wall_minus_boot", 0.0)))

    def save_clock_state(self, state: ClockState) -> None:
        self._writer.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (
            ("clock_offset", state.offset), ("boot_id", state.boot_id),
            ("wall_minus_boot", state.wall_minus_boot)))

    def offset_older_than(self, topic: TopicState, cutoff: int) -> int:
        """The last offset written before unix second `cutoff` (0 if none)."""
        row = self._writer.execute(
            "SELECT first_offset FROM time_marks WHERE topic_id = ? AND marked_at >= ?"
            " ORDER BY first_offset LIMIT 1", (topic.id, cutoff)).fetchone()
        return (row[0] if row is not None else topic.next_offset) - 1

    def offset_freeing(self, topic: TopicState, excess: int) -> int:
        """The smallest offset such that trimming up to it frees at least `excess` bytes.
        Reads only the rows it would trim."""
        freed = 0
        offset = 0
        for first, last, size, sizes in self._writer.execute(
                "SELECT first_offset, last_offset, length(payloads), sizes FROM batches"
                " WHERE topic_id = ? ORDER BY first_offset", (topic.id,)):
            if freed + size < excess:
                freed, offset = freed + size, last
                continue
            for offset, length in zip(itertools.count(first), batches.lengths(first, last, sizes, size)):
                freed += length
                if freed >= excess:
                    return offset
        return offset

    def set_policy(self, topic: TopicState, policy: TopicPolicy) -> None:
        self._writer.execute(
            "UPDATE topics SET max_messages = ?, max_bytes = ?, max_age = ?, on_full = ?,"
            " keep_uncommitted = ? WHERE id = ?", (*dataclasses.astuple(policy), topic.id))
        topic.policy = policy

    # -- durable consumers ------------------------------------------------------------

    def update_committed(self, consumer: str, topic: TopicState, offset: int) -> bool:
        """Store the committed offset of a consumer the topic has (writer thread).
        False if it has no such consumer (insert_consumer adds one)."""
        updated = self._writer.execute(
            "UPDATE consumers SET committed_offset = ?, updated_at = ? WHERE name = ? AND topic_id = ?"
            " RETURNING 1", (offset, int(time.time()), consumer, topic.id)).fetchall()
        if updated:
            self._refresh_min_committed(topic)
        return bool(updated)

    def insert_consumer(self, consumer: str, topic: TopicState, offset: int) -> None:
        """Add a named consumer to the topic with its committed offset (writer thread)."""
        self._writer.execute(
            "INSERT INTO consumers (name, topic_id, committed_offset, updated_at) VALUES (?, ?, ?, ?)",
            (consumer, topic.id, offset, int(time.time())))
        if topic.consumer_count is not None:
            topic.consumer_count += 1
        self._refresh_min_committed(topic)

    def consumer_count(self, topic: TopicState) -> int:
        """How many named consumers the topic has (writer thread): counted once, then kept
        by insert_consumer and delete_consumer (a reload after a rollback counts again)."""
        if topic.consumer_count is None:
            topic.consumer_count = self._writer.execute(
                "SELECT count(*) FROM consumers WHERE topic_id = ?", (topic.id,)).get
        return topic.consumer_count

    def delete_consumer(self, consumer: str, topics: Iterable[TopicState]) -> int:
        """Forget the consumer's offsets on these topics (writer thread). Returns how many."""
        deleted = 0
        for topic in topics:
            found = len(self._writer.execute(
                "DELETE FROM consumers WHERE name = ? AND topic_id = ? RETURNING 1",
                (consumer, topic.id)).fetchall())
            if found and topic.consumer_count is not None:
                topic.consumer_count -= found
            deleted += found
            self._refresh_min_committed(topic)
        return deleted

    def _refresh_min_committed(self, topic: TopicState) -> None:
        topic.min_committed = self._writer.execute(
            "SELECT min(committed_offset) FROM consumers WHERE topic_id = ?", (topic.id,)).get

    def committed_offset(self, consumer: str, topic_id: int) -> int | None:
        with self._reader("read committed offset") as conn:
            return conn.execute("SELECT committed_offset FROM consumers WHERE name = ? AND topic_id = ?",
                                (consumer, topic_id)).get

    def consumers(self) -> list[tuple[str, int, int, int]]:
        """Every (consumer, topic id, committed offset, updated at), by consumer and topic."""
        with self._reader("list consumers") as conn:
            return conn.execute("SELECT name, topic_id, committed_offset, updated_at FROM consumers"
                                " ORDER BY name, topic_id").fetchall()

    def free_space(self) -> int:
        """Bytes new messages can still take, less the reserve for trims and deletes.

        On the filesystem: its free space above the --min-free-space floor, less what
        the WAL may still grow by (up to its share) and what the database file grows by
        when the WAL is checkpointed into it. Within --max-db-size: the budget less the
        database (as the WAL will make it) and the WAL (its share, or more if it grew
        beyond). Free pages inside the file count as room in both."""
        with storage_errors("free space"):
            stats = os.statvfs(self._directory)
            database = self._writer.pragma("page_count") * self.page_size
            reusable = self._writer.pragma("freelist_count") * self.page_size
            wal = _file_size(self.path + "-wal")
            room = (stats.f_bavail * stats.f_frsize - self.options.min_free_space
                    - max(self._wal_share - wal, 0) - max(database - _file_size(self.path), 0))
            if self.options.max_db_size:
                room = min(room, self.options.max_db_size - database - max(wal, self._wal_share))
            return room + reusable - self._reserve

    def limit_wal(self) -> None:
        """After a commit: a WAL grown past its share (readers kept checkpoints from
        starting it over) is checkpointed in RESTART mode, which waits for those readers
        to move on, so that the next write starts it over and journal_size_limit cuts it
        back to its share."""
        if _file_size(self.path + "-wal") > self._wal_share:
            with storage_errors("checkpoint"):
                self._writer.pragma("wal_checkpoint", "RESTART")

    def give_back_space(self, max_pages: int = 2048) -> int:
        """Return up to max_pages free pages to the filesystem (outside a transaction).
        Returns how many free pages are left for next time."""
        with storage_errors("incremental vacuum"):
            # Each step of this pragma frees one page; fetching runs it to the end.
            self._writer.execute(f"PRAGMA incremental_vacuum({int(max_pages)})").fetchall()
            return self._writer.pragma("freelist_count")


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _filesystem_size(directory: str) -> int:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return 0  # the directory is missing: opening the database says so
    return stats.f_blocks * stats.f_frsize


def _keep_wal_files(conn: apsw.Connection) -> None:
    """Keep the -wal and -shm files when the last connection closes (SQLite empties the
    WAL instead of deleting it): they show that the database exists (_refuse_truncated)."""
    persist = ctypes.c_int(1)
    conn.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(persist))


def stored_messages(conn: apsw.Connection) -> list[tuple[str, int, bytes]]:
    """Every stored (topic name, offset, payload), by topic and offset: for looking into
    a database file (tests, forensics) without a server."""
    rows = conn.execute("SELECT t.name, b.first_offset, b.last_offset, b.payloads, b.sizes"
                        " FROM batches b JOIN topics t ON t.id = b.topic_id"
                        " ORDER BY b.topic_id, b.first_offset").fetchall()
    return [(name, offset, payload) for name, *row in rows
            for offset, payload in batches.unpack(*row)]


def _one_line(problems: list[str], limit: int = 200) -> str:
    """SQLite's multi-line integrity report, as one short line."""
    lines = [line.strip() for p in problems for line in p.splitlines()
             if line.strip() and not line.startswith("***")]
    text = "; ".join(lines)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _startup_error(where: str, path: str, exc: apsw.Error) -> StartupError:
    if isinstance(exc, (apsw.NotADBError, apsw.CorruptError)):
        return DamagedDatabase(f"{where} is not an SQLite database or is damaged ({exc})")
    if isinstance(exc, apsw.CantOpenError):
        return StartupError(f"cannot open {where}: {_open_hint(path)} ({exc})")
    if isinstance(exc, apsw.ReadOnlyError):
        return StartupError(f"{where} is read-only: {_open_hint(path)} ({exc})")
    return StartupError(f"cannot open {where}: {type(exc).__name__}: {exc}")


def _open_hint(path: str) -> str:
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"file {path!r} is not writable"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK):
        return f"directory {directory!r} is not writable"
    return "check the path and its permissions"
