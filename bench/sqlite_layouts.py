#!/usr/bin/env python3
"""Bytes written per message by candidate SQLite layouts, without a server: the steps
that led to storage format 4 (docs/flash-wear.md), each measured alone.

    .venv/bin/python bench/sqlite_layouts.py [--dir DIR] [--messages 3000]

For each layout, page size, auto_vacuum and durability it commits 100-byte messages
one per transaction (and 100 per transaction) into a new database in DIR (default: a
temporary directory next to this checkout, so on its filesystem: tmpfs counts nothing)
and prints this process's write_bytes (/proc/self/io) per message, through a final
checkpoint. Layouts:

- old: format 3: a rowid table with a (topic_id, first_offset) primary-key index beside
  it, and the topic's counters updated in every commit;
- without-rowid: the same key as a WITHOUT ROWID table, counters not updated;
- rowid-key: format 4: one rowid table keyed by (topic slot << 44) + first offset;
- rowid-key, 2 topics: the same, two topics taking messages in turn.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import apsw

ROOT = Path(__file__).resolve().parent.parent

TABLES = {
    "old": (
        "CREATE TABLE topics (id INTEGER PRIMARY KEY, next_offset INT, stored_bytes INT)",
        "CREATE TABLE rows (topic_id INT, first_offset INT, last_offset INT, payloads BLOB,"
        " sizes BLOB, PRIMARY KEY (topic_id, first_offset))",
    ),
    "without-rowid": (
        "CREATE TABLE rows (topic_id INT, first_offset INT, last_offset INT, payloads BLOB,"
        " sizes BLOB, PRIMARY KEY (topic_id, first_offset)) WITHOUT ROWID",
    ),
    "rowid-key": ("CREATE TABLE rows (key INTEGER PRIMARY KEY, last_offset INT, payloads BLOB,"
                  " sizes BLOB)",),
}

# (layout, page size, auto_vacuum, topics taking turns)
CASES = [
    ("old", 4096, "INCREMENTAL", 1),
    ("old", 512, "INCREMENTAL", 1),
    ("without-rowid", 1024, "INCREMENTAL", 1),
    ("rowid-key", 512, "INCREMENTAL", 1),
    ("rowid-key", 512, "NONE", 1),
    ("rowid-key", 1024, "NONE", 1),
    ("rowid-key", 512, "NONE", 2),
]


def written() -> int:
    text = Path("/proc/self/io").read_text()
    return int(re.search(r"^write_bytes:\s+(\d+)", text, re.MULTILINE).group(1))


def insert(conn: apsw.Connection, layout: str, topic: int, offset: int, count: int,
           payload: bytes) -> None:
    payloads, sizes = payload * count, (bytes([len(payload)]) * count if count > 1 else None)
    if layout == "rowid-key":
        conn.execute("INSERT INTO rows VALUES (?, ?, ?, ?)",
                     ((topic << 44) + offset, offset + count - 1, payloads, sizes))
        return
    conn.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?)",
                 (topic, offset, offset + count - 1, payloads, sizes))
    if layout == "old":
        conn.execute("UPDATE topics SET next_offset = ?, stored_bytes = stored_bytes + ?"
                     " WHERE id = ?", (offset + count, len(payloads), topic))


def measure(directory: Path, layout: str, page: int, vacuum: str, topics: int,
            durability: str, messages: int, per_commit: int) -> float:
    path = Path(tempfile.mkdtemp(dir=directory)) / "layout.db"
    conn = apsw.Connection(str(path))
    conn.pragma("page_size", page)
    conn.pragma("auto_vacuum", vacuum)
    conn.pragma("journal_mode", "WAL")
    conn.pragma("synchronous", durability)
    conn.pragma("wal_autocheckpoint", 4 * 1024**2 // page)
    for statement in TABLES[layout]:
        conn.execute(statement)
    if layout == "old":
        conn.executemany("INSERT INTO topics VALUES (?, 1, 0)", [(t,) for t in range(topics)])
    conn.pragma("wal_checkpoint", "TRUNCATE")
    offsets = [1] * topics
    before = written()
    for n in range(messages // per_commit):
        topic = n % topics
        with conn:
            insert(conn, layout, topic, offsets[topic], per_commit, b"m" * 100)
        offsets[topic] += per_commit
    conn.pragma("wal_checkpoint", "TRUNCATE")
    conn.close()
    return (written() - before) / (messages // per_commit * per_commit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or ROOT, prefix=".layouts-") as directory:
        print(f"{'layout':14} {'page':>5} {'auto_vacuum':11} {'topics':>6}"
              f" {'full, 1/commit':>15} {'normal, 1/commit':>17} {'full, 100/commit':>17}"
              f" {'normal, 100/commit':>19}   [bytes written per 100-byte message]")
        for layout, page, vacuum, topics in CASES:
            figures = [measure(Path(directory), layout, page, vacuum, topics, durability,
                               args.messages * (1 if per_commit == 1 else 10), per_commit)
                       for per_commit in (1, 100) for durability in ("FULL", "NORMAL")]
            print(f"{layout:14} {page:5} {vacuum:11} {topics:6}"
                  + "".join(f" {value:>{width},.0f}"
                            for value, width in zip(figures, (15, 17, 17, 19))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
