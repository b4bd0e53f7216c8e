"""Database files as older SMQ formats wrote them, for migration tests."""
from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

from smq.server.formats import MIGRATIONS


def write_third_format(path: Path, topics: dict[str, list[list[bytes]]], deleted: str) -> None:
    """A database as SMQ's format 3 wrote it: 4 KiB pages, auto_vacuum, `batches` rows of
    runs of messages with uint32 sizes, a deleted topic, a named consumer."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("PRAGMA journal_mode = WAL")
    for version in (1, 2, 3):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    for topic_id, (name, runs) in enumerate(topics.items(), 1):
        offset = 5  # 1..4 were trimmed before
        for run in runs:
            sizes = struct.pack(f"<{len(run)}I", *map(len, run)) if len(run) > 1 else None
            db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                       (topic_id, offset, offset + len(run) - 1, b"".join(run), sizes))
            offset += len(run)
        db.execute("INSERT INTO topics (id, name, next_offset, stored_bytes, created_at, deleted)"
                   " VALUES (?, ?, ?, ?, 0, ?)",
                   (topic_id, name, offset, sum(len(p) for r in runs for p in r), name == deleted))
    db.execute("DELETE FROM batches WHERE topic_id = (SELECT id FROM topics WHERE deleted)")
    db.execute("INSERT INTO consumers VALUES ('c', 1, 6, 0)")
    db.execute("PRAGMA user_version = 3")
    db.close()


THIRD = {
    "alpha": [[b"a1", b"a2", b"a3"], [b"solo"], [bytes([n]) * 300 for n in range(50)]],
    "gone": [[b"g"]],
    "beta": [[b"b%d" % n for n in range(500)], [b"z" * 5000]],
}
