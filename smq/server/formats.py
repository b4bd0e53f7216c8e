"""The database's format: its tables, how messages are keyed, its page size, and the
migrations that bring files of older formats forward (run by schema.DatabaseFile, which
also rebuilds a file whose page size is not PAGE_SIZE any more).
"""

from __future__ import annotations

from collections.abc import Callable

import apsw

from ..errors import StartupError

# Format of the database file, kept in PRAGMA user_version. Raise it with a
# migration in MIGRATIONS whenever the schema changes; an older SMQ refuses a newer file.
SCHEMA_VERSION = 4
# The pages the file is made of, chosen for flash wear (docs/flash-wear.md): a commit
# of one small message rewrites one page of its topic's table, and with 512-byte pages
# its WAL frame is 536 bytes, so that consecutive commits share a 4 KiB block of the
# disk. No auto_vacuum: trimmed pages are reused in place rather than moved about (and
# a pointer-map page is not rewritten with every new page).
PAGE_SIZE = 512
AUTO_VACUUM_NONE = 0
# Messages are rows of one table keyed by a single integer (a rowid table: no index to
# update beside it): a topic's slot in the high bits, the row's first offset in the low
# OFFSET_BITS. A slot is a live topic's (given at creation, freed by deletion), so a
# topic holds offsets up to MAX_OFFSET (17.6 trillion) and SLOTS topics can live at once.
OFFSET_BITS = 44
MAX_OFFSET = (1 << OFFSET_BITS) - 1
SLOTS = 1 << (63 - OFFSET_BITS)
# Consecutive messages of a topic share a row (batches.py). A commit of one message
# rewrites the last page of its topic's range, and only that page until it is full.
MESSAGE_ROWS = """CREATE TABLE message_rows (
    key         INTEGER PRIMARY KEY,  -- key_base(slot) + first_offset
    last_offset INTEGER NOT NULL,
    payloads    BLOB NOT NULL,        -- the payloads, one after the other
    sizes       BLOB                  -- their lengths (batches.py); NULL for one message
)"""


def key_base(slot: int) -> int:
    """The key of offset 0 of the topic in `slot`: a row's key is this plus its first offset."""
    return slot << OFFSET_BITS


def key_range(base: int) -> tuple[int, int]:
    """The first and last key of the topic whose rows start at `base`."""
    return base, base + MAX_OFFSET


def _keys_per_topic(conn: apsw.Connection) -> None:
    """Format 4: the rows of every topic move from `batches` (keyed by topic and offset,
    through an index) to `message_rows`, keyed by one integer: the topic's slot and the
    row's first offset. Slots are given in topic order."""
    too_far = conn.execute(
        "SELECT name FROM topics WHERE NOT deleted AND next_offset > ?", (MAX_OFFSET + 1,)
    ).fetchall()
    if too_far:
        raise StartupError(
            f"topic {too_far[0][0]!r} holds offsets beyond {MAX_OFFSET}, the highest "
            "format 4 stores: keep this database with the SMQ that wrote it"
        )
    conn.execute("ALTER TABLE topics ADD COLUMN slot INTEGER")
    live = [row[0] for row in conn.execute("SELECT id FROM topics WHERE NOT deleted ORDER BY id")]
    conn.executemany("UPDATE topics SET slot = ? WHERE id = ?", list(enumerate(live)))
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_slot', ?)", (len(live),))
    conn.execute("CREATE UNIQUE INDEX topics_by_slot ON topics (slot)")
    conn.execute(MESSAGE_ROWS)
    conn.execute(
        f"INSERT INTO message_rows (key, last_offset, payloads, sizes)"
        f" SELECT (t.slot << {OFFSET_BITS}) + b.first_offset, b.last_offset, b.payloads, b.sizes"
        " FROM batches b JOIN topics t ON t.id = b.topic_id WHERE NOT t.deleted"
        " ORDER BY t.slot, b.first_offset"
    )
    conn.execute("DROP TABLE batches")


Migration = tuple[str, ...] | Callable[[apsw.Connection], None]
MIGRATIONS: dict[int, Migration] = {
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
    3: ("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",),
    4: _keys_per_topic,
}
