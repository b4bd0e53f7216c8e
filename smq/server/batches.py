"""How messages are laid out in the database: consecutive messages of a topic share a row.

A row of the `batches` table holds the messages first_offset..last_offset of one
topic: their payloads one after the other in `payloads`, and their lengths as
little-endian uint32s in `sizes` (NULL when the row holds one message). Storing a
ProduceBatch of 100 messages is then one row, one index entry and a few pages
instead of 100 rows and 100 index entries: the commit, which is what a produce
waits for, writes less.

Rows stay below ROW_PAYLOAD_BYTES of payload (except a single larger message), so
that reading one message never loads much more than it returns.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence

ROW_PAYLOAD_BYTES = 64 * 1024

# (first_offset, last_offset, payloads, sizes): a row as stored
Row = tuple[int, int, bytes, "bytes | None"]


def pack(first: int, payloads: Sequence[bytes], size: int) -> list[Row]:
    """The rows storing payloads at offsets first, first + 1, ...; size: their total length."""
    if size <= ROW_PAYLOAD_BYTES:
        return [_row(first, payloads)]
    rows = []
    start = 0
    row_bytes = 0
    for index, payload in enumerate(payloads):
        if row_bytes + len(payload) > ROW_PAYLOAD_BYTES and index > start:
            rows.append(_row(first + start, payloads[start:index]))
            start, row_bytes = index, 0
        row_bytes += len(payload)
    rows.append(_row(first + start, payloads[start:]))
    return rows


def _row(first: int, payloads: Sequence[bytes]) -> Row:
    if len(payloads) == 1:
        return (first, first, payloads[0], None)
    sizes = struct.pack(f"<{len(payloads)}I", *map(len, payloads))
    return (first, first + len(payloads) - 1, b"".join(payloads), sizes)


def lengths(first: int, last: int, sizes: bytes | None, total: int) -> tuple[int, ...]:
    """The payload lengths of a row; total: the length of its payloads."""
    if sizes is None:
        return (total,)
    return struct.unpack(f"<{last - first + 1}I", sizes)


def unpack(
    first: int, last: int, payloads: bytes, sizes: bytes | None, from_offset: int = 0
) -> Iterator[tuple[int, bytes]]:
    """(offset, payload) of the row's messages with offset >= from_offset, ascending."""
    if last < from_offset:
        return
    if sizes is None:
        yield first, payloads
        return
    ends = list(itertools.accumulate(lengths(first, last, sizes, len(payloads))))
    skip = max(from_offset - first, 0)
    start = ends[skip - 1] if skip else 0
    for offset, end in zip(itertools.count(first + skip), ends[skip:]):
        yield offset, payloads[start:end]
        start = end


def message(
    first: int, last: int, payloads: bytes, sizes: bytes | None, offset: int
) -> bytes | None:
    """The payload at offset, or None if the row does not hold it."""
    if not first <= offset <= last:
        return None
    return next(unpack(first, last, payloads, sizes, offset))[1]
