"""pysmq (from PyPI) and smq.client in one interpreter, imported in either order, both
working against one server: an application moves from one to the other a module at a
time. Each order runs in a fresh interpreter, since the first import is what matters."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from support.servers import ServerProcess, clean_env, module_server

pytestmark = pytest.mark.process

pytest.importorskip("pysmq", reason="pysmq is a test dependency (requirements/dev.txt)")

BOTH = """
import json, sys
port, first = int(sys.argv[1]), sys.argv[2]
if first == "pysmq":
    import pysmq.client
    import smq.client
else:
    import smq.client
    import pysmq.client
from smq._proto import smq_pb2
from pysmq.proto import smq_pb2 as pysmq_pb2
topic = "both-" + first
with pysmq.client.Client("127.0.0.1", port) as old, smq.client.Client("127.0.0.1", port) as new:
    old.create_topic(topic)
    old_offset = old.produce(topic, b"from pysmq")
    new_offset = new.produce(topic, b"from smq.client")
    seen_by_old = [old.consume(topic, o)[0] for o in (old_offset, new_offset)]
    seen_by_new = [new.consume(topic, o).payload for o in (old_offset, new_offset)]
    # A message of one module parses as the other's: the same wire.
    mine = smq_pb2.ProduceRequest(topic=topic, message=b"m")
    theirs = pysmq_pb2.ProduceRequest.FromString(mine.SerializeToString())
print(json.dumps({
    "offsets": [old_offset, new_offset],
    "seen_by_old": [m.decode() for m in seen_by_old],
    "seen_by_new": [m.decode() for m in seen_by_new],
    "names": [type(mine).DESCRIPTOR.full_name, type(theirs).DESCRIPTOR.full_name],
    "parsed": [theirs.topic, theirs.message.decode()],
}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "coimport")
    yield proc
    proc.close()


@pytest.mark.parametrize("first", ["pysmq", "smq"])
def test_pysmq_and_smq_client_in_one_process(server: ServerProcess, first: str) -> None:
    result = subprocess.run([sys.executable, "-c", BOTH, str(server.port), first],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["offsets"][1] == out["offsets"][0] + 1
    assert out["seen_by_old"] == out["seen_by_new"] == ["from pysmq", "from smq.client"]
    assert out["names"] == ["smq.ProduceRequest", "smq.ProduceRequest"]
    assert out["parsed"] == ["both-" + first, "m"]


CLIENT_ONLY = """
import asyncio, sys
BLOCKED = {"apsw", "dotenv", "sdnotify", "nats", "prometheus_client"}  # the server's and the forwarder's only


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed (client-only install)")


sys.meta_path.insert(0, Blocker())
from smq.client import AsyncClient, Client, Producer
port = int(sys.argv[1])
with Client("127.0.0.1", port) as client, Producer(client) as producer:
    client.create_topic("client-only")
    first = producer.send("client-only", b"a").result(timeout=30)


async def main():
    async with AsyncClient("127.0.0.1", port) as client:
        return await client.produce("client-only", b"b")


print(first, asyncio.run(main()))
"""


def test_the_client_needs_only_grpcio_and_protobuf(server: ServerProcess) -> None:
    """docs/client.md installs the wheel with --no-deps plus grpcio and protobuf for a
    client-only application: the client must not import the server's dependencies."""
    result = subprocess.run([sys.executable, "-c", CLIENT_ONLY, str(server.port)],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = map(int, result.stdout.split())
    assert second == first + 1
