"""How messages are laid out in the database: consecutive messages of a topic share a row.

A row of the `message_rows` table (schema.py) holds the messages first_offset..
last_offset of one topic: their payloads one after the other in `payloads`, and their
lengths in `sizes` (NULL when the row holds one message) as little-endian unsigned
integers of 1, 2 or 4 bytes each, the fewest that hold the longest (the width is the
length of `sizes` over the number of messages; files of format 2 and 3 have 4). Storing
a ProduceBatch of 100 messages is then one row and a few pages instead of 100 rows: the
commit, which is what a produce waits for, writes less.

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


# struct's code for the unsigned integer of each width
SIZE_CODES = {1: "B", 2: "H", 4: "I"}


def _row(first: int, payloads: Sequence[bytes]) -> Row:
    if len(payloads) == 1:
        return (first, first, payloads[0], None)
    lengths = list(map(len, payloads))
    longest = max(lengths)
    code = "B" if longest < 1 << 8 else "H" if longest < 1 << 16 else "I"
    sizes = struct.pack(f"<{len(payloads)}{code}", *lengths)
    return (first, first + len(payloads) - 1, b"".join(payloads), sizes)


def lengths(first: int, last: int, sizes: bytes | None, total: int) -> tuple[int, ...]:
    """The payload lengths of a row; total: the length of its payloads."""
    if sizes is None:
        return (total,)
    count = last - first + 1
    return struct.unpack(f"<{count}{SIZE_CODES[len(sizes) // count]}", sizes)


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
