"""The `smq` commands that talk to a server: output for people and for programs, exit
codes, stdin, Unix socket, Ctrl-C; and serving still works as before."""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ROOT
from support.poll import eventually
from support.servers import Run, ServerProcess, clean_env, module_server, point_cli_at

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "cli", socket=True)
    yield proc
    proc.close()


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: ServerProcess) -> None:
    point_cli_at(server, monkeypatch, tmp_path)


@pytest.fixture
def topic(smq: Run, request: pytest.FixtureRequest) -> str:
    name = request.node.name.replace("[", "_").replace("]", "")
    assert smq("topic", "create", name)[0] == 0
    return name


def test_produce_and_consume_for_people(smq: Run, topic: str) -> None:
    assert smq("produce", topic, '{"t": 21.5}') == (0, f"appended 1 message to {topic!r}, offset 1\n", "")
    assert smq("produce", topic, "tab\there, back\\slash, bell\a, é")[0] == 0
    code, out, err = smq("consume", topic)
    assert (code, err) == (0, "")
    assert out == '1\t{"t": 21.5}\n2\ttab\\there, back\\\\slash, bell\\x07, é\n'


def test_produce_lines_from_stdin(smq: Run, topic: str) -> None:
    code, out, _ = smq("produce", topic, stdin=b"one\ntwo\r\n\nlast without newline")
    assert (code, out) == (0, f"appended 4 messages to {topic!r}, offsets 1-4\n")
    assert smq("produce", topic, "-", stdin=b"five\n")[1].endswith("offset 5\n")
    assert smq("consume", topic)[1] == "1\tone\n2\ttwo\n3\t\n4\tlast without newline\n5\tfive\n"
    code, out, _ = smq("produce", topic, "--json", "--batch-size", "2", stdin=b"a\nb\nc\n")
    assert json.loads(out) == {"topic": topic, "count": 3, "first_offset": 6, "last_offset": 8}
    assert smq("produce", topic, stdin=b"")[1] == f"appended 0 messages to {topic!r}\n"


def test_produce_many_lines_batches_them(smq: Run, topic: str) -> None:
    lines = b"".join(b"line %d\n" % i for i in range(1, 5001))
    code, out, _ = smq("produce", topic, "--json", stdin=lines)
    assert json.loads(out) == {"topic": topic, "count": 5000, "first_offset": 1, "last_offset": 5000}
    code, out, _ = smq("consume", topic, "--from", "4999")
    assert out == "4999\tline 4999\n5000\tline 5000\n"



def test_produce_stops_at_a_failed_batch_and_says_what_was_appended(smq: Run, topic: str,
                                                                    client) -> None:
    limit = client.server_info().max_message_size
    lines = b"a\nb\nc\n" + b"x" * (limit + 1) + b"\ne\nf\n"
    # One message per batch: where batches end otherwise depends on when a sender is free.
    code, out, err = smq("produce", topic, "--batch-size", "1", stdin=lines)
    assert code != 0 and out == ""
    assert "3 messages of the input were appended before this failure, up to offset 3" in err
    assert "2 messages sent after it were appended too" in err  # sent before the failure was known
    assert smq("consume", topic)[1] == "1\ta\n2\tb\n3\tc\n4\te\n5\tf\n"

def test_whole_input_as_one_binary_message(smq: Run, topic: str) -> None:
    data = bytes(range(256)) * 4
    assert smq("produce", topic, "--whole", stdin=data)[0] == 0
    code, out, _ = smq("consume", topic, "--json")
    record = json.loads(out)
    assert record["offset"] == 1 and "payload" not in record
    assert base64.b64decode(record["payload_base64"]) == data
    assert "\\x00\\x01" in smq("consume", topic)[1]


def test_consume_from_and_limit(smq: Run, topic: str) -> None:
    smq("produce", topic, stdin=b"".join(b"m%d\n" % i for i in range(1, 11)))
    assert smq("consume", topic, "--from", "latest")[1] == "10\tm10\n"
    assert smq("consume", topic, "--from", "3", "--limit", "2")[1] == "3\tm3\n4\tm4\n"
    assert smq("consume", topic, "-n", "1")[1] == "1\tm1\n"
    assert smq("consume", topic, "--from", "11")[1] == ""
    lines = smq("consume", topic, "--json", "--from", "9")[1].splitlines()
    assert [json.loads(line) for line in lines] == [
        {"topic": topic, "offset": 9, "payload": "m9"}, {"topic": topic, "offset": 10, "payload": "m10"}]


def test_consume_an_empty_topic(smq: Run, topic: str) -> None:
    assert smq("consume", topic) == (0, "", "")
    assert smq("consume", topic, "--from", "latest") == (0, "", "")


def test_offsets_and_trim(smq: Run, topic: str) -> None:
    assert smq("offsets", topic)[1] == "earliest  -\nlatest    -\n(empty: the next message gets offset 1)\n"
    smq("produce", topic, stdin=b"a\nb\nc\n")
    assert smq("offsets", topic)[1] == "earliest  1\nlatest    3\n"
    assert smq("trim", topic, "2") == (0, "deleted messages up to offset 2; the earliest is now 3\n", "")
    assert json.loads(smq("offsets", topic, "--json")[1]) == \
        {"topic": topic, "earliest": 3, "latest": 3, "next": 4}
    assert smq("trim", topic, "10")[1].endswith("the topic is now empty\n")


def test_topic_commands(smq: Run) -> None:
    assert smq("topic", "create", "cli-t") == (0, "created topic 'cli-t'\n", "")
    assert smq("topic", "create", "cli-t") == (0, "topic 'cli-t' already exists\n", "")
    smq("produce", "cli-t", "hello")
    out = smq("topic", "list")[1]
    assert out.splitlines()[0].split() == ["TOPIC", "MESSAGES", "EARLIEST", "LATEST", "BYTES"]
    assert ["cli-t", "1", "1", "1", "5"] in [line.split() for line in out.splitlines()]
    records = [json.loads(line) for line in smq("topic", "list", "--json")[1].splitlines()]
    assert {"topic": "cli-t", "earliest": 1, "latest": 1, "next": 2, "messages": 1, "bytes": 5} \
        .items() <= next(r for r in records if r["topic"] == "cli-t").items()
    out = smq("topic", "describe", "cli-t")[1]
    assert "topic     cli-t\nmessages  1\nearliest  1\nlatest    1\nnext      2\nbytes     5\ncreated   20" in out
    assert json.loads(smq("topic", "describe", "cli-t", "--json")[1])["created_at"] > 1_600_000_000
    assert smq("topic", "delete", "cli-t") == (0, "deleted topic 'cli-t'\n", "")
    assert json.loads(smq("topic", "create", "cli-t", "--json")[1]) == {"topic": "cli-t", "created": True}


def test_ping(smq: Run, server: ServerProcess) -> None:
    code, out, _ = smq("ping")
    assert code == 0 and out.startswith(f"127.0.0.1:{server.port} answered in ")
    record = json.loads(smq("ping", "--json")[1])
    assert record["ok"] is True and record["target"] == f"127.0.0.1:{server.port}"


def test_failures_exit_1_and_say_why(smq: Run, tmp_path: Path) -> None:
    code, out, err = smq("produce", "no-such-topic", "x")
    assert (code, out) == (1, "")
    assert err == ("smq: error: could not produce to 'no-such-topic': topic 'no-such-topic' does not "
                   "exist\n(list topics with: smq topic list; create one with: smq topic create NAME)\n")
    code, _, err = smq("topic", "create", "bad name")
    assert code == 1 and "invalid topic name 'bad name'" in err
    code, _, err = smq("ping", "--port", "1", "--timeout", "2")
    assert code == 1 and "cannot reach the SMQ server at 127.0.0.1:1" in err
    assert "--host/--port" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["consume", "t", "--from", "yesterday"], ["consume"], ["produce"], ["trim", "t", "-3"],
    ["topic"], ["topic", "frob"], ["ping", "--port", "http"], ["ping", "--timeout", "0"],
    ["frob"], ["--port", "1", "ping"], ["produce", "t", "msg", "--whole"],
    ["ping", "--env-file", "missing.env"],
])
def test_usage_errors_exit_2(smq: Run, args: list[str]) -> None:
    code, out, err = smq(*args)
    assert code == 2 and "error" in err and "Traceback" not in err


def test_unix_socket_target_and_precedence(smq: Run, server: ServerProcess,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1")  # TCP would fail
    assert smq("ping", "--unix-socket", server.socket)[1].startswith(f"unix:{server.socket} answered")
    monkeypatch.delenv("PORT")
    monkeypatch.setenv("SMQ_UNIX_SOCKET", server.socket)
    assert smq("ping")[1].startswith("unix:")  # a socket from the environment is used...
    assert smq("ping", "--port", str(server.port))[1].startswith("127.0.0.1:")  # ...unless --port
    Path(".env").write_text("SMQ_UNIX_SOCKET=/nowhere\n")
    assert smq("ping")[1].startswith("unix:" + server.socket)  # environment beats .env


def test_remote_writes_disabled_point_to_the_socket(start_server, smq: Run, tmp_path: Path) -> None:
    socket = str(tmp_path / "s.sock")
    server = start_server("--allow-remote-writes=false", "--unix-socket", socket)
    port = ["--port", str(server.port)]
    assert smq("topic", "create", "t", "--unix-socket", socket)[0] == 0
    code, _, err = smq("topic", "delete", "t", *port)
    assert code == 1 and "remote writes are disabled" in err and "--unix-socket PATH" in err
    assert smq("produce", "t", "x", *port)[0] == 1
    assert smq("consume", "t", *port)[0] == 0  # reading is fine
    assert smq("topic", "delete", "t", "--unix-socket", socket) == (0, "deleted topic 't'\n", "")


# -- as a separate process: help, version, serving, Ctrl-C, broken pipes -----------------------

def run_smq(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smq", *args], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60, **kwargs)


def test_help_and_version_are_fast_and_show_examples() -> None:
    code = ("import sys; from smq import cli\n"
            "try: cli.main(sys.argv[1:])\n"
            "except SystemExit: pass\n"
            "assert 'grpc' not in sys.modules, 'grpc imported'\n")
    for args in (["--help"], ["--version"], ["consume", "--help"], ["topic", "create", "--help"]):
        result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=clean_env(),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    result = run_smq("--version")
    assert result.stdout == "smq 0.1.0\n"
    top = run_smq("--help").stdout
    for command in ("serve", "topic create", "produce TOPIC", "consume TOPIC", "offsets TOPIC",
                    "trim TOPIC OFFSET", "ping"):
        assert command in top
    assert "examples:" in top and "--dbpath" in top
    for command in (["topic"], ["topic", "create"], ["topic", "list"], ["topic", "describe"],
                    ["topic", "delete"], ["produce"], ["consume"], ["offsets"], ["trim"], ["ping"]):
        result = run_smq(*command, "--help")
        assert result.returncode == 0 and "examples:\n  smq " + command[0] in result.stdout, command


def test_serving_is_unchanged(start_server, tmp_path: Path) -> None:
    spelled_out = ServerProcess(["serve", "--dbpath", str(tmp_path / "a.db"), "--port", "0",
                                 "--bind", "127.0.0.1"], tmp_path).wait_serving()
    try:
        env = clean_env(PORT=str(spelled_out.port), SMQ_HOST="127.0.0.1")
        assert run_smq("ping", env=env).returncode == 0
    finally:
        spelled_out.close()
    result = run_smq("--port", "70000")
    assert result.returncode == 2 and "invalid --port" in result.stderr


def test_ctrl_c_ends_follow_cleanly(server: ServerProcess, smq: Run, topic: str) -> None:
    smq("produce", topic, "before")
    env = clean_env(PORT=str(server.port), SMQ_HOST="127.0.0.1")
    follower = subprocess.Popen([sys.executable, "-m", "smq", "consume", topic, "--follow"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follower.stdout.readline() == b"1\tbefore\n"
    smq("produce", topic, "live")
    assert follower.stdout.readline() == b"2\tlive\n"  # flushed as it comes
    follower.send_signal(signal.SIGINT)
    out, err = follower.communicate(timeout=60)  # generous: CI machines can be loaded
    assert (follower.returncode, out, err) == (0, b"", b"")



def test_ctrl_c_during_produce_says_how_far_the_input_went(server: ServerProcess, client,
                                                          topic: str) -> None:
    env = clean_env(PORT=str(server.port), SMQ_HOST="127.0.0.1")
    producer = subprocess.Popen([sys.executable, "-m", "smq", "produce", topic], cwd=ROOT,
                                env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdin.write(b"one\ntwo\nthree\n")
    producer.stdin.flush()  # the pipe stays open: smq waits for more
    eventually(lambda: client.describe_topic(topic).latest_offset == 3, timeout=30)
    producer.send_signal(signal.SIGINT)
    _, err = producer.communicate(timeout=60)
    assert producer.returncode == 130
    assert err.decode().splitlines() == [
        "smq: interrupted: 3 messages of the input were appended, up to offset 3"]

def test_a_closed_pipe_ends_follow_quietly(server: ServerProcess, smq: Run, topic: str) -> None:
    """`smq consume t --follow | head -n 1`: when the reader goes, smq goes, quietly."""
    smq("produce", topic, stdin=b"1\n2\n3\n")
    env = clean_env(PORT=str(server.port), SMQ_HOST="127.0.0.1")
    follower = subprocess.Popen([sys.executable, "-m", "smq", "consume", topic, "--follow"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follower.stdout.readline() == b"1\t1\n"
    follower.stdout.close()
    smq("produce", topic, "more")  # the follower's next write finds no reader
    err = follower.stderr.read()
    assert follower.wait(20) == 0 and b"Traceback" not in err, err
