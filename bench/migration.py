#!/usr/bin/env python3
"""How long the first start of SMQ takes on a database of format 1 (one row per message),
which it migrates to the current format (format 4, rebuilt with 512-byte pages):

    .venv/bin/python bench/migration.py [--messages 1000000] [--size 100] [--topics 4]

It writes a format-1 file the way the first SMQ did (its schema is MIGRATIONS[1]), then
opens it with smq.server.storage.Storage, which migrates it, and prints one table row: messages,
file size before and after, the migration's time, and the largest the directory got
while it ran (the copy needs room). A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from smq.server.formats import MIGRATIONS
from smq.server.schema import StorageOptions
from smq.server.storage import Storage  # noqa: E402

MiB = 1024**2


def write_format_1(path: str, messages: int, size: int, topics: int) -> None:
    conn = apsw.Connection(path)
    conn.pragma("auto_vacuum", "INCREMENTAL")
    conn.pragma("journal_mode", "WAL")
    conn.pragma("synchronous", "OFF")  # setting up the input, not what is measured
    with conn:
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        per_topic = messages // topics
        payload = b"m" * size
        for topic_id in range(1, topics + 1):
            conn.execute("INSERT INTO topics (id, name, next_offset, stored_bytes, created_at)"
                         " VALUES (?, ?, ?, ?, 0)", (topic_id, f"topic-{topic_id}", per_topic + 1,
                                                     per_topic * size))
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?)",
                             ((topic_id, offset, payload) for offset in range(1, per_topic + 1)))
        conn.pragma("user_version", 1)
    conn.pragma("wal_checkpoint", "TRUNCATE")
    conn.close()


def directory_bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=100, help="payload bytes")
    parser.add_argument("--topics", type=int, default=4)
    parser.add_argument("--durability", default="full", choices=("full", "normal"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smq-migration-") as directory:
        path = os.path.join(directory, "v1.db")
        write_format_1(path, args.messages, args.size, args.topics)
        before = directory_bytes(directory)
        peak = [before]
        done = threading.Event()

        def watch() -> None:  # the directory's size while the migration runs
            while not done.wait(0.05):
                peak[0] = max(peak[0], directory_bytes(directory))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        storage = Storage(path, StorageOptions(durability=args.durability))
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
        storage.close()
        after = directory_bytes(directory)
    print(f"{'messages':>10} {'payload':>8} {'before MiB':>10} {'after MiB':>9} "
          f"{'peak MiB':>8} {'seconds':>8}")
    print(f"{args.messages:>10,} {args.size:>7}B {before / MiB:>10.1f} {after / MiB:>9.1f} "
          f"{peak[0] / MiB:>8.1f} {seconds:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
