"""Message pages on the wire: their exact encoded size.

A page must fit gRPC's send limit by what it weighs on the wire, not by its payloads:
each message of a page is one element of `repeated RetrievedMessage messages = 1`,
which costs a tag, a length, the payload's own tag and length, and the offset's tag and
varint (longer for larger offsets) beyond the payload. `entry_size` counts exactly that,
and `fit` cuts a page to a byte budget by it. tests/test_encoding.py checks the sizes
against protobuf's own encoding.
"""
from __future__ import annotations

from collections.abc import Sequence




def varint_size(value: int) -> int:
    """Bytes of an int64 as a varint (negative ones take all ten)."""
    if value < 0:
        return 10
    return (value.bit_length() + 6) // 7 or 1


def fields_size(offset: int, length: int) -> int:
    """Encoded size of a RetrievedMessage or ConsumeResponse: `message` (absent when
    empty) and `offset` (absent when 0), as proto3 leaves out default values."""
    size = 1 + varint_size(length) + length if length else 0
    return size + (1 + varint_size(offset) if offset else 0)


def entry_size(offset: int, length: int) -> int:
    """What one message adds to a page: a RetrievedMessage inside `messages = 1`."""
    inner = fields_size(offset, length)
    return 1 + varint_size(inner) + inner


def fit(page: Page, max_bytes: int) -> Page:
    """The longest head of `page` whose entries weigh at most `max_bytes` on the wire,
    but always at least one message (a message larger than that travels alone)."""
    size = 0
    for count, (offset, payload) in enumerate(page):
        size += entry_size(offset, len(payload))
        if size > max_bytes and count:
            return page[:count]
    return page


def page_size(page: Page) -> int:
    """The encoded size of a page's entries."""
    return sum(entry_size(offset, len(payload)) for offset, payload in page)
