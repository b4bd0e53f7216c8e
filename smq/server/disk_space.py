"""The disk budget's measure, on the writer thread: how much new messages can still
take (free_space, for retention.Retention.reserve_space) and a WAL kept to its share by
checkpoints. Pages freed by trims and deletes stay in the file, where new messages
reuse them, and count as room (the file does not shrink: schema.py). Part of
storage.Storage (a mixin, with storage.py's writer connection).
"""

from __future__ import annotations

import os

import apsw

from .schema import DatabaseFile, StorageOptions, file_size, storage_errors


class DiskSpace:
    """Storage's methods on the database file's size and the filesystem's free space."""

    path: str
    options: StorageOptions
    page_size: int
    _file: DatabaseFile
    _writer: apsw.Connection

    def free_space(self) -> int:
        """Bytes new messages can still take, less the reserve for trims and deletes.

        On the filesystem: its free space above the --min-free-space floor, less what
        the WAL may still grow by (up to its share) and what the database file grows by
        when the WAL is checkpointed into it. Within --max-db-size: the budget less the
        database (as the WAL will make it) and the WAL (its share, or more if it grew
        beyond). Free pages inside the file count as room in both."""
        with storage_errors("free space"):
            stats = os.statvfs(self._file.directory)
            database = self._writer.pragma("page_count") * self.page_size
            reusable = self._writer.pragma("freelist_count") * self.page_size
            wal = file_size(self.path + "-wal")
            room = (
                stats.f_bavail * stats.f_frsize
                - self.options.min_free_space
                - max(self._file.wal_share - wal, 0)
                - max(database - file_size(self.path), 0)
            )
            if self.options.max_db_size:
                room = min(
                    room, self.options.max_db_size - database - max(wal, self._file.wal_share)
                )
            return room + reusable - self._file.reserve

    def limit_wal(self) -> None:
        """After a commit: a WAL grown past its share (readers kept checkpoints from
        starting it over) is checkpointed in RESTART mode, which waits for those readers
        to move on, so that the next write starts it over and journal_size_limit cuts it
        back to its share."""
        if file_size(self.path + "-wal") > self._file.wal_share:
            with storage_errors("checkpoint"):
                self._writer.pragma("wal_checkpoint", "RESTART")
