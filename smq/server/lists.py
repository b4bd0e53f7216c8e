"""List answers (ListTopics, ListConsumers) in pages that fit the server's send limit.

A page holds the entries after the request's page token, at most `page_size` of them
(and MAX_PAGE_SIZE), and only as many as fit `limit` bytes once encoded: the encoded
size is counted exactly (each entry's ByteSize() plus its field framing, and the next
page token), so gRPC never refuses the answer as larger than its send limit. A request
without page_size and page_token, as clients from before paging send it, gets the whole
list, or ListTooLarge when it would not fit one answer: never a silently cut list.

A token is the last entry's sort key, its names joined by "/" (names never hold one).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from google.protobuf.message import Message

from ..domain import check_name
from ..errors import InvalidArgument, ListTooLarge

MAX_PAGE_SIZE = 10_000
TOKEN_SEPARATOR = "/"

Entry = TypeVar("Entry")
Reply = TypeVar("Reply", bound=Message)  # the message that carries an entry
Key = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Listing(Generic[Entry, Reply]):
    """A kind of list: what it holds (for messages), the sort key of an entry (its
    names, `parts` of them) and the message that carries an entry."""

    what: str
    parts: int
    key: Callable[[Entry], Key]
    message: Callable[[Entry], Reply]


@dataclasses.dataclass(frozen=True)
class PageRequest:
    """What the request asks: `size` entries at most (0: not said), after `token`."""

    size: int = 0
    token: str = ""

    @property
    def paged(self) -> bool:
        return self.size > 0 or bool(self.token)


@dataclasses.dataclass(frozen=True)
class Page(Generic[Reply]):
    messages: list[Reply]
    next_token: str  # "" after the last page


def field_size(length: int) -> int:
    """Encoded bytes of a length-delimited field numbered below 16 holding `length` bytes:
    a one-byte tag, the length as a varint, the bytes."""
    return 1 + _varint_size(length) + length


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def page_of(
    listing: Listing[Entry, Reply], entries: Sequence[Entry], request: PageRequest, limit: int
) -> Page[Reply]:
    """The page of `entries` (sorted by `listing.key`) that `request` asks for, within
    `limit` encoded bytes. Raises InvalidArgument for a bad request, ListTooLarge for a
    whole list that does not fit."""
    if request.size < 0:
        raise InvalidArgument(
            f"page_size must be 0 (the server's maximum) or more, not {request.size}"
        )
    start = 0
    if request.token:
        start = bisect.bisect_right(entries, _key_of(request.token, listing.parts), key=listing.key)
    most = min(request.size or MAX_PAGE_SIZE, MAX_PAGE_SIZE) if request.paged else len(entries)
    page: list[Reply] = []
    size = 0
    for entry in entries[start : start + most]:
        message = listing.message(entry)
        cost = field_size(message.ByteSize())
        # The answer is the entries (field 1) and the token (field 2), nothing else; keep
        # room for the token in case this entry ends the page.
        if page and size + cost + field_size(len(_token(listing.key(entry)).encode())) > limit:
            break
        page.append(message)
        size += cost
    remaining = len(entries) - start - len(page)
    if remaining and not request.paged:
        raise ListTooLarge(
            f"the {len(entries)} {listing.what} do not fit one answer of at most {limit} bytes "
            "(the server's send limit): ask for pages with page_size and page_token "
            "(smq.client and the smq command do)"
        )
    return Page(page, _token(listing.key(entries[start + len(page) - 1])) if remaining else "")


def _token(key: Key) -> str:
    return TOKEN_SEPARATOR.join(key)


def _key_of(token: str, parts: int) -> Key:
    key = tuple(token.split(TOKEN_SEPARATOR))
    try:
        if len(key) != parts:
            raise InvalidArgument(f"expected {parts} names")
        for name in key:
            check_name(name, "name")
    except InvalidArgument:
        shown = token if len(token) <= 60 else token[:57] + "..."
        raise InvalidArgument(
            f"invalid page_token {shown!r}: pass the next_page_token of the "
            "previous page, or none for the first page"
        ) from None
    return key
