"""Fixtures shared by every test folder (helpers live in tests/support/).

`smq_server` starts `python -m smq` with a database in the test's temp dir and
returns a ServerProcess; `start_server` starts more (or restarts on the same file).
Every test gets a clean environment: no SMQ variable of the developer's leaks in.

Markers (pyproject.toml): `slow` (left out unless asked for with -m slow) and
`process`, which the tests that start processes (servers, the CLI as a program,
nats-server, builds) carry; everything under tests/e2e/ and tests/system/ gets it
here. The fast in-process layer is what remains:
    ./dev test -m "not slow and not process"
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smq._proto import smq_pb2_grpc
from support.servers import Run, ServerProcess

HERE = Path(__file__).resolve().parent
PROCESS_FOLDERS = (HERE / "e2e", HERE / "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(folder in item.path.parents for folder in PROCESS_FOLDERS):
            item.add_marker(pytest.mark.process)


@pytest.fixture
def smq(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Run:
    return Run(capsys, monkeypatch)


@pytest.fixture
def client(server: ServerProcess) -> Iterator:
    """An smq.client.Client on the module's `server` fixture (modules that define one)."""
    from smq.client import Client
    with Client("127.0.0.1", server.port) as client:
        yield client


@pytest.fixture
def topic(client, request: pytest.FixtureRequest) -> str:
    """A topic of the test's own name on `client`'s server."""
    name = request.node.name.replace("[", "_").replace("]", "")[:200]
    client.create_topic(name)
    return name


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """start_server(*flags, db=, env=, wait=True, command=) -> ServerProcess on a free port.
    `command` replaces the server command (e.g. a wrapper in front of SERVER_COMMAND)."""
    started: list[ServerProcess] = []

    def start(*flags: str, db: Path | str | None = None, env: dict[str, str] | None = None,
              wait: bool = True, port: str = "0",
              command: list[str] | None = None) -> ServerProcess:
        args = ["--dbpath", str(db or tmp_path / "smq.db"), "--port", port,
                "--bind", "127.0.0.1", *flags]
        server = ServerProcess(args, tmp_path, env, command)
        started.append(server)
        return server.wait_serving() if wait else server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def smq_server(start_server) -> ServerProcess:
    return start_server("--heartbeat-interval", "0.2")


@pytest.fixture
def stub(smq_server: ServerProcess) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return smq_server.stub()
