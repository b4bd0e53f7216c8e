"""`python -m smq COMMAND` against a server whose access-control file denies the call:
exit code 1, the server's words (identity, right, topic) in one line after the command's
action, no hint about remote writes, no traceback, no gRPC C-core line; allowed commands
work as ever."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.acl_servers import AclServer, writer_reader_server
from support.servers import C_CORE_LINE, clean_env

pytestmark = pytest.mark.process  # starts servers and commands (tests/conftest.py)

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    yield from writer_reader_server(tmp_path_factory, 2)


def smq(server: AclServer, identity: str, *args: str, cwd: Path) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `python -m smq ARGS` connected as `identity`."""
    command, *rest = args
    result = subprocess.run([sys.executable, "-m", "smq", command, *rest,
                             *server.cli_flags(identity)],
                            cwd=cwd, capture_output=True, text=True, timeout=60, env=clean_env())
    assert "Traceback" not in result.stderr and not C_CORE_LINE.search(result.stderr), \
        result.stderr
    return result.returncode, result.stdout, result.stderr.splitlines()


@pytest.mark.parametrize("args, action, denied", [
    (("produce", "sensors.a", "x"), "produce to 'sensors.a'", "produce to"),
    (("topic", "create", "sensors.b"), "create topic 'sensors.b'", "administer"),
], ids=["produce", "topic create"])
def test_a_denied_command_fails_in_one_line_with_the_servers_words(
        server: AclServer, tmp_path: Path, args: tuple[str, ...], action: str, denied: str):
    code, out, err = smq(server, "reader", *args, cwd=tmp_path)
    topic = args[-1] if args[0] == "topic" else args[1]
    assert code == 1 and out == ""
    assert err == [f'smq: error: could not {action}: identity "reader" may not {denied} topic '
                   f'"{topic}" (acl file {server.acl_path})']


def test_a_denied_consume_fails_at_once(server: AclServer, tmp_path: Path):
    code, _, err = smq(server, "writer", "consume", "sensors.a", "--follow", cwd=tmp_path)
    assert code == 1 and len(err) == 1, err  # it asks for the offsets first: consume or admin
    assert 'identity "writer" may not consume from or administer topic "sensors.a"' in err[0]


def test_allowed_commands_work(server: AclServer, tmp_path: Path):
    assert smq(server, "writer", "produce", "sensors.a", "hello", cwd=tmp_path)[0] == 0
    code, out, err = smq(server, "reader", "consume", "sensors.a", "--from", "3", cwd=tmp_path)
    assert (code, err) == (0, []) and "hello" in out
    code, out, _ = smq(server, "reader", "topic", "list", cwd=tmp_path)
    assert code == 0 and "sensors.a" in out
