"""A server's access-control file, as the client sees it: a denied call raises
AccessDenied (a PermissionDenied, and the pysmq class of the operation) with the
server's words naming the identity, the right and the topic, and not the remote-writes
hint; resuming readers do not retry it; listings hold only what the identity may see."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from support.acl_servers import AclServer, writer_reader_server

import smq
from smq import errors
from smq.client import AsyncClient, Client, ClientTLSConfig

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    yield from writer_reader_server(tmp_path_factory, 3)


def client_as(server: AclServer, identity: str) -> Client:
    return Client("localhost", server.process.port, ClientTLSConfig(*server.files_of(identity)))


def expected(identity: str, verb: str, topic: str, server: AclServer) -> str:
    return f'identity "{identity}" may not {verb} topic "{topic}" (acl file {server.acl_path})'


def test_a_denied_produce_raises_access_denied_with_the_servers_words(server: AclServer):
    with client_as(server, "reader") as client:
        with pytest.raises(errors.AccessDenied) as caught:
            client.produce("sensors.a", b"x")
    error = caught.value
    assert isinstance(error, smq.PermissionDenied) and isinstance(error, smq.SMQProduceError)
    assert error.details == expected("reader", "produce to", "sensors.a", server)
    assert str(error) == f"could not produce to 'sensors.a': {error.details}"
    assert "Unix socket" not in str(error)  # the remote-writes hint is not for this


def test_allowed_calls_go_through(server: AclServer):
    with client_as(server, "writer") as writer, client_as(server, "reader") as reader:
        offset = writer.produce("sensors.a", b"w")
        assert reader.consume("sensors.a", offset).payload == b"w"
        assert [t.name for t in reader.list_topics()] == ["sensors.a"]
        assert writer.list_topics() == []  # produce only: nothing to list


@pytest.mark.parametrize("read", ["subscribe", "iter_messages"])
def test_resuming_readers_raise_it_at_once_instead_of_retrying(server: AclServer, read: str):
    with client_as(server, "writer") as client:
        started = time.monotonic()
        with pytest.raises(errors.AccessDenied) as caught:
            next(getattr(client, read)("sensors.a"))
        assert time.monotonic() - started < 5
    assert isinstance(caught.value, smq.SMQConsumeError)
    assert caught.value.details == expected("writer", "consume from", "sensors.a", server)


def test_the_async_client_raises_it_too(server: AclServer):
    async def main() -> None:
        tls = ClientTLSConfig(*server.files_of("reader"))
        async with AsyncClient("localhost", server.process.port, tls) as client:
            with pytest.raises(errors.AccessDenied, match="may not administer"):
                await client.create_topic("sensors.new")

    asyncio.run(main())
