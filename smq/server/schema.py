"""The database file: its format (tables, migrations) and how it is opened.

DatabaseFile opens one SMQ database: locks it against a second server, refuses files
that are not SMQ's, newer than this SMQ, damaged or truncated (or moves them aside),
switches to WAL mode, sets the durability, migrates older formats forward (rebuilding
the file when its page size changes: `_rebuild`), and sizes the WAL and the reserve
from the disk budget. Called once at start-up (main thread);
storage.Storage owns what it opened. Also `storage_errors`, the one translation of apsw
errors into the SMQ error tree, used around every read and write.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Iterator

import apsw

from ..errors import SMQError, StartupError, StorageFailure, StorageFull
from ..systemd import Notifier
from .formats import AUTO_VACUUM_NONE, MIGRATIONS, PAGE_SIZE, SCHEMA_VERSION

log = logging.getLogger("smq.server.storage")

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
# The WAL is checkpointed into the database when it holds this much (less for small
# budgets: half the WAL's share): each checkpoint writes the pages changed since the
# last one once, so fewer checkpoints write the pages that change often (the tree's
# inner pages, the topics' rows) fewer times.
CHECKPOINT_BYTES = 4 * 1024**2
# A migration or rebuild copies the file: systemd is asked for this long, plus a second
# per COPY_BYTES_PER_SECOND of the file (a slow SD card), beyond its start timeout.
LONG_STEP_SECONDS = 60
COPY_BYTES_PER_SECOND = 1024**2
MIGRATION_ROOM = 3  # free space a migration needs, in multiples of the database (+ WAL)


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    durability: str = "full"  # a key of DURABILITY_PRAGMAS
    readers: int = 4  # read connections in the pool
    startup_check: str = "quick"  # 'quick': PRAGMA quick_check on open; 'off'
    on_corrupt: str = "refuse"  # 'refuse' or 'move-aside' (rename it, start fresh)
    max_db_size: int = 0  # bytes; 0: no limit (SQLite's max_page_count enforces it)
    min_free_space: int = 0  # bytes that must stay free on the filesystem


class DamagedDatabase(StartupError):
    """The file is not SQLite, or SQLite finds it damaged or truncated."""


class DatabaseFile:
    """An open SMQ database file: `writer` is the connection of the writer thread;
    `connect()` opens more (the readers)."""

    def __init__(self, path: str, options: StorageOptions) -> None:
        self.path = path
        self.options = options
        self.directory = os.path.dirname(os.path.abspath(path))  # for free_space()
        existed = os.path.exists(path)  # before _lock_database creates it
        self.lock_fd = self._lock_database()
        budget = options.max_db_size or _filesystem_size(self.directory)
        self.reserve = min(max(budget // 16, DELETE_RESERVE_MIN), DELETE_RESERVE_MAX)
        self.trim_step = self.reserve // 4  # payload bytes a large trim deletes per transaction
        self.wal_share = min(max(budget // 8, WAL_SHARE_MIN), WAL_SIZE_LIMIT)
        found = {suffix: os.path.exists(path + suffix) for suffix in ("", "-wal", "-shm")}
        found[""] = existed
        try:
            self.writer = self._open_writer(existed)
        except DamagedDatabase as exc:
            if options.on_corrupt != "move-aside":
                self._leave_as_found(found)
                raise
            moved = self._move_aside()
            log.error(
                "DATABASE DAMAGED: %s; moved it to %s and starting with an EMPTY "
                "database (--on-corrupt=move-aside)",
                exc,
                moved,
            )
            self._unlock_database()
            self.lock_fd = self._lock_database()
            self.writer = self._open_writer(existed=False)
        except BaseException:
            self._leave_as_found(found)
            raise
        self.page_size = self.writer.pragma("page_size")

    def connect(self, flags: int, query_only: bool = False) -> apsw.Connection:
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
            conn = self.connect(apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            version = conn.pragma("user_version")
            if version > SCHEMA_VERSION:
                raise StartupError(
                    f"{where} has format {version}, written by a newer SMQ; this SMQ reads "
                    f"formats up to {SCHEMA_VERSION}: upgrade SMQ, or point --dbpath at another "
                    "file"
                )
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").get:
                raise StartupError(f"{where} is an SQLite database but not an SMQ one")
            if version == 0:
                # Both must be set before the first table exists.
                conn.pragma("page_size", PAGE_SIZE)
                conn.pragma("auto_vacuum", AUTO_VACUUM_NONE)
            if conn.pragma("journal_mode", "WAL") != "wal":
                raise StartupError(
                    f"{where}: cannot switch to WAL mode (is the directory writable?)"
                )
            conn.pragma("synchronous", DURABILITY_PRAGMAS[self.options.durability])
            conn.pragma("journal_size_limit", self.wal_share)
            conn.pragma(
                "wal_autocheckpoint",
                min(self.wal_share // 2, CHECKPOINT_BYTES) // conn.pragma("page_size"),
            )
            if self.options.startup_check == "quick":
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise DamagedDatabase(f"{where} is damaged: {_one_line(problems)}")
            self._migrate(conn, version)
            if (conn.pragma("page_size"), conn.pragma("auto_vacuum")) != (
                PAGE_SIZE,
                AUTO_VACUUM_NONE,
            ):
                conn = self._rebuild(conn)
            if self.options.max_db_size:
                # SQLite's own hard limit: the budget less the WAL's share. SMQ's writes
                # stop a reserve earlier (free_space), which trims and deletes may use.
                pages = (self.options.max_db_size - self.wal_share) // conn.pragma("page_size")
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
        advice = (
            "restore it from a backup, or start with --on-corrupt move-aside to move "
            "these files aside and start with an empty database"
        )
        if not existed:
            if wal_bytes:
                raise DamagedDatabase(
                    f"{where} is missing but its WAL {wal!r} holds {wal_bytes} "
                    f"bytes of it: {advice}"
                )
            return
        size = os.path.getsize(self.path)
        if size >= MIN_DATABASE_BYTES:
            return  # SQLite and quick_check judge the rest
        if size and not (os.path.exists(wal) or os.path.exists(shm)):
            raise DamagedDatabase(
                f"{where} is {size} bytes long, too short for an SQLite database: {advice}"
            )
        if os.path.exists(wal) or os.path.exists(shm):
            evidence = (
                f"its WAL holds {wal_bytes} bytes"
                if wal_bytes
                else "the -wal/-shm files beside it show that it held one"
            )
            raise DamagedDatabase(
                f"{where} is {size} bytes long but {evidence}: it was truncated; {advice}"
            )

    def _leave_as_found(self, found: dict[str, bool]) -> None:
        """After a refusal: remove the files that opening made (the empty database file
        of _lock_database, SQLite's -wal and -shm), then unlock. A refused database is
        left as it was, and the -wal/-shm made here cannot later pass for evidence that
        it held data (_refuse_truncated). A WAL that holds anything stays, even one made
        here: what a migration committed before a later step failed is in it."""
        for suffix, existed in found.items():
            path = self.path + suffix
            if not existed and not (suffix == "-wal" and file_size(path)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
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
            raise StartupError(
                f"cannot open {where}: {_open_hint(self.path)} ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"{where} is in use by another SMQ server; stop it or choose another --dbpath"
            ) from None
        return fd

    def _unlock_database(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def _move_aside(self) -> str:
        """Rename the database (and its WAL and shared-memory files) out of the way."""
        target = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, target + suffix)
        return target

    def _long_step(self, what: str) -> None:
        """Before a step that copies the database: ask systemd (if it started us) for the
        time it may take, and say what it waits for in the status line. (The log says it
        once the step is done: a refusal stays one line.)"""
        seconds = LONG_STEP_SECONDS + os.path.getsize(self.path) / COPY_BYTES_PER_SECOND
        Notifier().extend_startup(seconds, what)

    def _migrate(self, conn: apsw.Connection, version: int) -> None:
        if version and version < SCHEMA_VERSION:
            self._check_room_to_migrate()
        for target in range(version + 1, SCHEMA_VERSION + 1):
            migration = MIGRATIONS[target]
            if version:  # an existing file, not a new one
                self._long_step(f"migrating the database to format {target}")
            try:
                # Not `with conn`: after a FullError SQLite has rolled back already, and
                # the context manager's ROLLBACK would raise over it.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if callable(migration):
                        migration(conn)
                    else:
                        for statement in migration:
                            conn.execute(statement)
                    conn.pragma("user_version", target)
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.getautocommit():
                        conn.execute("ROLLBACK")
                    raise
            except apsw.FullError:
                raise StartupError(
                    f"database {self.path!r}: no room to migrate it to format {target} (it needs "
                    "free space of about three times its size); the file is unchanged: "
                    "free some space and start again"
                ) from None
            log.info("database format migrated to %d", target)
        if version and version < SCHEMA_VERSION:
            # Migrations copy tables: give the old ones' pages back to the disk now (or,
            # if even that finds no room, little by little later, as after trims).
            try:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
                conn.pragma("wal_checkpoint", "TRUNCATE")
            except apsw.FullError:
                log.warning("no room to give the old format's pages back yet")

    def _rebuild_paths(self) -> tuple[str, str]:
        """The database file itself (SQLite keeps the WAL beside a symlink's target, and
        the rebuilt file goes there too) and the rebuild's temporary file beside it."""
        real = os.path.realpath(self.path)
        return real, real + ".rebuild"

    def _check_room_to_migrate(self) -> None:
        """Before a file of an older format is touched: the directory must take new files
        (the rebuild's copy) and the filesystem must have room for what the migration
        and the rebuild write, about three times the database and its WAL (the rows
        copied inside the file, their WAL, then the rebuilt copy); else refuse, with the
        file unchanged."""
        real, probe = self._rebuild_paths()
        _remove(probe)
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(
                f"database {self.path!r} must be migrated to format {SCHEMA_VERSION}, which "
                f"writes a new file beside it, but {probe!r} cannot be made ({exc.strerror}); "
                "the file is unchanged"
            ) from None
        size = file_size(real) + file_size(real + "-wal")
        stats = os.statvfs(os.path.dirname(real))
        free = stats.f_bavail * stats.f_frsize
        if free < MIGRATION_ROOM * size:
            raise StartupError(
                f"database {self.path!r}: no room to migrate it to format {SCHEMA_VERSION}: "
                f"it needs about {MIGRATION_ROOM * size // 1024**2 + 1} MiB free (three times "
                f"its size), the filesystem has {free // 1024**2} MiB; the file is unchanged: "
                "free some space and start again"
            )

    def _rebuild(self, conn: apsw.Connection) -> apsw.Connection:
        """Write the database anew with PAGE_SIZE pages and no auto_vacuum (SQLite cannot
        change a WAL database's page size in place), then put the new file in the old
        one's place and open it. The old file stays whole until the new one, complete
        and synced, replaces it in one rename; a stopped rebuild leaves only a
        `.rebuild` file, removed by the next start."""
        where = f"database {self.path!r}"
        no_room = StartupError(
            f"{where}: no room to rebuild it with {PAGE_SIZE}-byte pages (it is copied once: "
            "needs free space of about its size); nothing is lost: free some space and "
            "start again"
        )
        real, temporary = self._rebuild_paths()
        for leftover in (temporary, temporary + "-journal"):
            _remove(leftover)
        # The whole database into the main file, so that the new one is all of it and
        # the old WAL left beside it is empty (it must not be replayed into the new one).
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        except apsw.FullError:
            raise no_room from None
        if busy or file_size(real + "-wal"):
            raise StartupError(f"{where}: cannot checkpoint it to change its page size")
        self._long_step(f"rebuilding the database with {PAGE_SIZE}-byte pages")
        new_fd = None
        try:
            new_fd = _create_like(temporary, real)  # its owner and mode, not the umask's
            conn.pragma("page_size", PAGE_SIZE)
            conn.pragma("auto_vacuum", AUTO_VACUUM_NONE)
            conn.execute("VACUUM INTO ?", (temporary,))
        except BaseException as exc:
            if new_fd is not None:
                os.close(new_fd)
            _remove(temporary)
            if isinstance(exc, apsw.FullError):
                raise no_room from None
            raise
        conn.close()
        fcntl.flock(new_fd, fcntl.LOCK_EX)  # nobody else knows the file yet
        os.fsync(new_fd)
        os.replace(temporary, real)
        _fsync_directory(os.path.dirname(real))
        _remove(real + "-shm")  # the old database's; SQLite makes a new one
        self._unlock_database()
        self.lock_fd = new_fd
        log.info("database rebuilt with %d-byte pages", PAGE_SIZE)
        return self._open_writer(existed=True)

    def close(self) -> None:
        """Checkpoint the WAL into the main file, close the writer's connection, unlock."""
        with contextlib.suppress(apsw.Error):
            self.writer.pragma("wal_checkpoint", "TRUNCATE")
        self.writer.close()
        self._unlock_database()


def _remove(path: str) -> None:
    """Remove a file SMQ made, if it is there; refuse to start if something else is."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"{path!r} is in the way ({exc.strerror}): remove it") from None


def file_size(path: str) -> int:
    """The file's size; 0 if it is not there."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _create_like(path: str, model: str) -> int:
    """Create an empty file with the owner and permissions of `model`; its descriptor."""
    stat = os.stat(model)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, stat.st_uid, stat.st_gid)
        os.fchmod(fd, stat.st_mode & 0o7777)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _one_line(problems: list[str], limit: int = 200) -> str:
    """SQLite's multi-line integrity report, as one short line."""
    lines = [
        line.strip()
        for p in problems
        for line in p.splitlines()
        if line.strip() and not line.startswith("***")
    ]
    text = "; ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
