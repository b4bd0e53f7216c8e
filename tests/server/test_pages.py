"""Every page fits the server's send limit by its encoded size, end to end.

Messages of 312 to 460 bytes made full pages (10,000 messages, or 3 MiB of payload)
whose framing took them past the 3 MiB + 64 KiB send limit: BulkRetrieve(limit=10000)
and Subscribe at the server's page size failed with RESOURCE_EXHAUSTED "Sent message
larger than max", and smq.client.subscribe() could not read such a topic at all. The
topic here holds 30,000 of them, so that offsets also pass 16,384 (a longer varint).
"""
from __future__ import annotations

import random

import pytest

from smq._proto import smq_pb2
from smq.client import Client

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

COUNT = 30_000
DEADLINE = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support.servers import module_server
    proc = module_server(tmp_path_factory, "pages")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def payloads(server) -> list[bytes]:
    rng = random.Random(13)
    sent = [rng.randbytes(rng.randint(312, 460)) for _ in range(COUNT)]
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="framed"), timeout=DEADLINE)
    for start in range(0, COUNT, 5_000):
        stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="framed", messages=sent[start:start + 5_000]),
                          timeout=DEADLINE)
    return sent


def test_bulk_retrieve_pages_of_10000_are_answered(server, payloads):
    stub = server.stub()
    got, start, pages = [], 1, 0
    while start <= COUNT:
        reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="framed", start_offset=start,
                                                              limit=10_000), timeout=DEADLINE)
        assert reply.count == len(reply.messages) > 0
        assert reply.ByteSize() <= 3 * 1024**2 + 64 * 1024
        got += [(m.offset, m.message) for m in reply.messages]
        start, pages = reply.next_offset, pages + 1
    assert got == list(enumerate(payloads, 1))
    assert pages < 20  # pages stay nearly full: ~6,800 to 9,700 messages each


def test_subscribe_at_the_server_page_size(server, payloads):
    stream = server.stub().Subscribe(smq_pb2.SubscribeRequest(topic="framed", offset=1),
                                     timeout=DEADLINE)
    got = []
    for reply in stream:
        got += [(m.offset, m.message) for m in reply.messages]
        if len(got) >= COUNT:
            break
    stream.cancel()
    assert got == list(enumerate(payloads, 1))


def test_smq_client_subscribe_reads_the_topic(server, payloads):
    with Client("127.0.0.1", server.port) as client:
        got = []
        for message in client.subscribe("framed", reconnect=False):
            got.append((message.offset, message.payload))
            if len(got) == COUNT:
                break
    assert got == list(enumerate(payloads, 1))
