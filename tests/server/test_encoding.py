"""Pages on the wire (smq/server/encoding.py) against protobuf's own encoding, property-based:
every byte of the hand-encoded replies, the size of every message's entry, and that a
page cut by `fit` never exceeds the server's send limit by its encoded size, for any
payload size from 0 to the largest --max-message-size and offsets up to 2**63 - 1."""
from __future__ import annotations

from hypothesis import example, given, settings, strategies as st

from smq.server import encoding
from smq._proto import smq_pb2
from smq.server.app import ENVELOPE_BYTES
from smq.server.service import PAGE_BYTES

MAX_MESSAGE_SIZE = 64 * 1024**2  # the largest --max-message-size accepted
INT64_MAX = 2**63 - 1
# Where a varint grows by a byte, and around them.
BOUNDARIES = sorted({n + d for n in (2**7, 2**14, 2**21, 2**28, 2**35, 2**42, 2**49, 2**56,
                                     2**62, 2**63 - 1) for d in (-1, 0, 1)} - {2**63})
offsets = st.one_of(st.integers(1, 2**16), st.integers(1, INT64_MAX), st.sampled_from(BOUNDARIES),
                    st.integers(2**62 - 10_000, 2**62 + 10_000))
sizes = st.one_of(st.integers(0, 2_000), st.sampled_from([n for n in BOUNDARIES if n <= 2**22]),
                  st.integers(0, 4 * 1024**2))
PROPERTY = settings(max_examples=300, deadline=None)


def entries(page) -> smq_pb2.BulkRetrieveResponse:
    """A reply of the page's messages only: what `page_size` counts."""
    return smq_pb2.BulkRetrieveResponse(
        messages=[smq_pb2.RetrievedMessage(message=p, offset=o) for o, p in page])


def bulk_reply(page, next_offset: int) -> smq_pb2.BulkRetrieveResponse:
    return smq_pb2.BulkRetrieveResponse(
        messages=[smq_pb2.RetrievedMessage(message=p, offset=o) for o, p in page],
        count=len(page), next_offset=next_offset)


def page_of(first: int, lengths: list[int]) -> list[tuple[int, bytes]]:
    return [(first + n, b"m" * length) for n, length in enumerate(lengths)]


@PROPERTY
@given(offsets, sizes)
@example(1, 0)
@example(INT64_MAX, MAX_MESSAGE_SIZE)
@example(2**62, MAX_MESSAGE_SIZE - 1)
def test_entry_size_is_what_protobuf_encodes(offset: int, size: int):
    payload = b"p" * size
    entry = smq_pb2.BulkRetrieveResponse(messages=[smq_pb2.RetrievedMessage(message=payload,
                                                                            offset=offset)])
    assert encoding.entry_size(offset, size) == entry.ByteSize()
    consume = smq_pb2.ConsumeResponse(message=payload, offset=offset)
    assert encoding.fields_size(offset, size) == consume.ByteSize()


@PROPERTY
@given(offsets, st.lists(st.integers(0, 3_000), max_size=40),
       st.one_of(offsets, st.integers(-2**63, 0)))
def test_replies_are_encoded_byte_for_byte_as_protobuf_does(first: int, lengths: list[int],
                                                            next_offset: int):
    page = page_of(min(first, INT64_MAX - len(lengths)), lengths)
    assert encoding.bulk_retrieve_response(page, next_offset) == \
        bulk_reply(page, next_offset).SerializeToString()
    subscribe = smq_pb2.SubscribeResponse(
        messages=[smq_pb2.RetrievedMessage(message=p, offset=o) for o, p in page],
        next_offset=next_offset)
    assert encoding.subscribe_response(page, next_offset) == subscribe.SerializeToString()
    for offset, payload in page[:3] + [(next_offset, b"")]:
        assert encoding.consume_response(offset, payload) == \
            smq_pb2.ConsumeResponse(message=payload, offset=offset).SerializeToString()


def check_fit(page, max_bytes: int) -> list:
    fitted = encoding.fit(page, max_bytes)
    assert fitted == page[:len(fitted)] and (fitted or not page)
    messages_size = entries(fitted).ByteSize()
    assert messages_size == encoding.page_size(fitted)
    if len(fitted) > 1:
        assert messages_size <= max_bytes
    if len(fitted) < len(page):  # cut by size: the next message would not have fit
        assert encoding.page_size(page[:len(fitted) + 1]) > max_bytes
    return fitted


@PROPERTY
@given(offsets, st.lists(st.integers(0, 20_000), max_size=60), st.integers(1, 300_000))
def test_fit_keeps_pages_within_their_byte_budget(first: int, lengths: list[int], max_bytes: int):
    check_fit(page_of(min(first, INT64_MAX - len(lengths)), lengths), max_bytes)


@settings(max_examples=25, deadline=None)
@given(st.integers(312, 460), st.sampled_from([1, 2**14, 2**21, 2**62, INT64_MAX - 20_000]))
def test_full_pages_of_small_messages_fit_the_send_limit(size: int, first: int):
    """The issue's case: 10,000 messages of 312-460 bytes overflowed the 3 MiB + 64 KiB
    send limit by their framing when only payloads were counted."""
    page = page_of(first, [size] * 10_000)
    fitted = check_fit(page, PAGE_BYTES)
    reply = bulk_reply(fitted, min(fitted[-1][0] + 1, INT64_MAX))
    assert reply.ByteSize() <= PAGE_BYTES + ENVELOPE_BYTES


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.sampled_from([0, 1, PAGE_BYTES, PAGE_BYTES + 1, MAX_MESSAGE_SIZE]),
                 st.integers(0, MAX_MESSAGE_SIZE)), offsets)
def test_a_message_larger_than_a_page_travels_alone_within_the_limit(size: int, offset: int):
    """The send limit is max(--max-message-size, PAGE_BYTES) + ENVELOPE_BYTES."""
    page = [(offset, b"x" * size), (min(offset + 1, INT64_MAX), b"y")]
    fitted = encoding.fit(page, PAGE_BYTES)
    assert len(fitted) == (1 if encoding.page_size(page) > PAGE_BYTES else 2)
    reply = bulk_reply(fitted, min(fitted[-1][0] + 1, INT64_MAX))
    assert reply.ByteSize() <= max(size, PAGE_BYTES) + ENVELOPE_BYTES
