"""The `smq` commands for topic policies, durable named consumers and server info, and
`smq consume --consumer`, against a real server: output for people and for programs,
exit codes, help."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ROOT
from support.servers import Run, ServerProcess, clean_env, module_server, point_cli_at
from smq.client import Client

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

POLICY_DEFAULTS = """\
SETTING           OVERRIDE  EFFECTIVE
max-messages      -         no limit
max-bytes         -         no limit
max-age           -         forever
on-full           -         reject
keep-uncommitted  -         false
(-: the server's default)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "cli-admin")
    yield proc
    proc.close()


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: ServerProcess) -> None:
    point_cli_at(server, monkeypatch, tmp_path)


@pytest.fixture
def topic(smq: Run, request: pytest.FixtureRequest) -> str:
    """A topic with messages m1..m5 at offsets 1..5."""
    name = request.node.name.replace("[", "_").replace("]", "")
    assert smq("topic", "create", name)[0] == 0
    assert smq("produce", name, stdin=b"m1\nm2\nm3\nm4\nm5\n")[0] == 0
    return name


# -- smq topic policy ----------------------------------------------------------------------------

def test_policy_shows_overrides_and_effective(smq: Run, topic: str) -> None:
    assert smq("topic", "policy", topic) == (0, POLICY_DEFAULTS, "")
    record = json.loads(smq("topic", "policy", topic, "--json")[1])
    assert record == {"topic": topic,
                      "overrides": dict.fromkeys(["max_messages", "max_bytes", "max_age", "on_full",
                                                  "keep_uncommitted"]),
                      "effective": {"max_messages": 0, "max_bytes": 0, "max_age": 0,
                                    "on_full": "reject", "keep_uncommitted": False}}


def test_setting_options_merges_with_the_overrides(smq: Run, topic: str, client: Client) -> None:
    code, out, err = smq("topic", "policy", topic, "--max-age", "7d", "--max-bytes", "512KiB")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"set the policy of topic {topic!r}"
    assert "max-bytes         512KiB    512KiB" in out and "max-age           7d        7d" in out
    # One more option keeps the others (SetTopicPolicy itself would replace them all).
    code, out, _ = smq("topic", "policy", topic, "--on-full", "drop-oldest", "--json")
    assert json.loads(out)["overrides"] == {"max_messages": None, "max_bytes": 512 * 1024,
                                            "max_age": 7 * 86400, "on_full": "drop-oldest",
                                            "keep_uncommitted": None}
    smq("topic", "policy", topic, "--max-messages", "3", "--keep-uncommitted", "true",
        "--max-age", "default")
    overrides, effective = client.get_topic_policy(topic)
    assert (overrides.max_messages, overrides.max_bytes, overrides.max_age, overrides.on_full,
            overrides.keep_uncommitted) == (3, 512 * 1024, None, "drop-oldest", True)
    assert effective.max_age == 0


def test_reset_clears_the_overrides(smq: Run, topic: str, client: Client) -> None:
    smq("topic", "policy", topic, "--max-age", "1h", "--on-full", "drop-oldest")
    code, out, _ = smq("topic", "policy", topic, "--reset")
    assert (code, out) == (0, f"reset the policy of topic {topic!r}\n" + POLICY_DEFAULTS)
    smq("topic", "policy", topic, "--max-age", "1h", "--on-full", "drop-oldest")
    code, out, _ = smq("topic", "policy", topic, "--reset", "--max-messages", "0", "--json")
    assert json.loads(out)["overrides"]["max_messages"] == 0  # --reset, then only these
    assert client.get_topic_policy(topic)[0].max_age is None


@pytest.mark.parametrize("args", [
    ["--max-age", "1.5s"], ["--max-age", "soon"], ["--max-bytes", "12x"], ["--max-bytes", "-1"],
    ["--max-messages", "-3"], ["--max-messages", "many"], ["--on-full", "panic"],
    ["--keep-uncommitted", "maybe"],
])
def test_policy_usage_errors_exit_2(smq: Run, topic: str, args: list[str]) -> None:
    code, out, err = smq("topic", "policy", topic, *args)
    assert (code, out) == (2, "") and f"argument {args[0]}" in err and "or default" in err


def test_policy_of_a_missing_topic(smq: Run) -> None:
    for args in ([], ["--max-age", "1d"]):
        code, out, err = smq("topic", "policy", "no-such-topic", *args)
        assert (code, out) == (1, "")
        assert "topic 'no-such-topic' does not exist" in err and "smq topic list" in err


def test_policy_needs_a_local_writer_when_remote_writes_are_disabled(start_server, smq: Run,
                                                                    tmp_path: Path) -> None:
    socket = str(tmp_path / "s.sock")
    server = start_server("--allow-remote-writes=false", "--unix-socket", socket)
    port = ["--port", str(server.port)]
    smq("topic", "create", "t", "--unix-socket", socket)
    assert smq("topic", "policy", "t", *port) == (0, POLICY_DEFAULTS, "")  # reading is fine
    code, _, err = smq("topic", "policy", "t", "--max-age", "1d", *port)
    assert code == 1 and "remote writes are disabled" in err and "--unix-socket PATH" in err
    assert smq("topic", "policy", "t", "--max-age", "1d", "--unix-socket", socket)[0] == 0


# -- smq consumer ----------------------------------------------------------------------------------

def test_consumer_commit_get_list_delete(smq: Run, topic: str) -> None:
    assert smq("consumer", "commit", "fwd", topic, "3") == \
        (0, f"consumer 'fwd' committed offset 3 of {topic!r}; it resumes at 4\n", "")
    assert json.loads(smq("consumer", "commit", "audit", topic, "0", "--json")[1]) == \
        {"consumer": "audit", "topic": topic, "committed_offset": 0}
    assert smq("consumer", "get", "fwd", topic)[1] == \
        f"consumer    fwd\ntopic       {topic}\ncommitted   3\nresumes at  4\n"
    assert json.loads(smq("consumer", "get", "fwd", topic, "--json")[1])["committed_offset"] == 3

    out = smq("consumer", "list", "--topic", topic)[1].splitlines()
    assert out[0].split() == ["CONSUMER", "TOPIC", "COMMITTED", "LAG", "UPDATED"]
    assert [line.split()[:4] for line in out[1:]] == [["audit", topic, "0", "5"], ["fwd", topic, "3", "2"]]
    assert out[1].endswith(" UTC")
    records = [json.loads(line) for line in smq("consumer", "list", "fwd", "--json")[1].splitlines()]
    assert [(r["consumer"], r["topic"], r["committed_offset"], r["lag"]) for r in records
            if r["topic"] == topic] == [("fwd", topic, 3, 2)]
    assert records[0]["updated_at"] > 1_600_000_000

    assert smq("consumer", "delete", "fwd", "--topic", topic) == \
        (0, f"deleted consumer 'fwd' on topic {topic!r}\n", "")
    assert json.loads(smq("consumer", "delete", "audit", "--json")[1]) == \
        {"consumer": "audit", "topic": None, "deleted": True}
    assert smq("consumer", "list", "--topic", topic)[1] == (
        f"no consumers on topic {topic!r} (a consumer appears once it commits: smq consumer "
        "commit NAME TOPIC OFFSET, or smq consume TOPIC --consumer NAME)\n")
    assert smq("consumer", "list", "nobody", "--topic", topic, "--json") == (0, "", "")


def test_consumer_failures_exit_1_and_say_why(smq: Run, topic: str) -> None:
    code, out, err = smq("consumer", "get", "nobody", topic)
    assert (code, out) == (1, "")
    assert err == (f"smq: error: could not get the committed offset of consumer 'nobody' on {topic!r}: "
                   f"consumer 'nobody' has no committed offset on topic {topic!r}\n"
                   "(list consumers with: smq consumer list; topics with: smq topic list)\n")
    code, _, err = smq("consumer", "commit", "c", topic, "6")
    assert code == 1 and "offset 6 is above the latest offset 5" in err
    code, _, err = smq("consumer", "commit", "bad name", topic, "1")
    assert code == 1 and "bad name" in err
    code, _, err = smq("consumer", "commit", "c", "no-such-topic", "1")
    assert code == 1 and "topic 'no-such-topic' does not exist" in err
    code, _, err = smq("consumer", "delete", "nobody")
    assert code == 1 and "consumer 'nobody' has no committed offset" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["consumer"], ["consumer", "frob"], ["consumer", "get", "c"], ["consumer", "commit", "c", "t"],
    ["consumer", "commit", "c", "t", "-1"], ["consumer", "commit", "c", "t", "x"],
    ["consumer", "delete"], ["info", "extra"], ["topic", "policy"],
])
def test_usage_errors_exit_2(smq: Run, args: list[str]) -> None:
    code, out, err = smq(*args)
    assert code == 2 and out == "" and "error" in err and "Traceback" not in err


# -- smq consume --consumer -----------------------------------------------------------------------

def test_consume_as_a_consumer_resumes_where_it_left_off(smq: Run, topic: str, client: Client) -> None:
    assert smq("consume", topic, "--consumer", "reader", "--limit", "2")[1] == "1\tm1\n2\tm2\n"
    assert client.committed_offset("reader", topic) == 2  # --limit: what was printed
    assert smq("consume", topic, "--consumer", "reader")[1] == "3\tm3\n4\tm4\n5\tm5\n"
    assert client.committed_offset("reader", topic) == 5
    assert smq("consume", topic, "--consumer", "reader") == (0, "", "")  # nothing new
    smq("produce", topic, "m6")
    lines = smq("consume", topic, "--consumer", "reader", "--json")[1].splitlines()
    assert [json.loads(line) for line in lines] == [{"topic": topic, "offset": 6, "payload": "m6"}]
    # --from is where a consumer starts that has committed nothing.
    assert smq("consume", topic, "--consumer", "late", "--from", "latest")[1] == "6\tm6\n"
    assert smq("consume", topic, "--consumer", "late", "--from", "latest")[1] == ""
    # Its committed offset wins over --from.
    assert smq("consume", topic, "--consumer", "reader", "--from", "1")[1] == ""


def test_consume_as_a_consumer_of_a_missing_topic(smq: Run) -> None:
    code, out, err = smq("consume", "no-such-topic", "--consumer", "c")
    assert (code, out) == (1, "") and "does not exist" in err and "smq topic list" in err


def test_follow_as_a_consumer_commits_what_it_printed(server: ServerProcess, smq: Run, topic: str,
                                                       client: Client) -> None:
    client.commit_offset("live", topic, 3)
    env = clean_env(PORT=str(server.port), SMQ_HOST="127.0.0.1")
    follower = subprocess.Popen([sys.executable, "-m", "smq", "consume", topic, "--consumer", "live",
                                 "--follow"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        assert [follower.stdout.readline() for _ in range(2)] == [b"4\tm4\n", b"5\tm5\n"]
        smq("produce", topic, "m6")
        assert follower.stdout.readline() == b"6\tm6\n"
        smq("produce", topic, "m7")
        assert follower.stdout.readline() == b"7\tm7\n"
        assert client.committed_offset("live", topic) >= 6  # page by page, as it goes
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=20)
    assert (follower.returncode, out, err) == (0, b"", b"")
    assert client.committed_offset("live", topic) == 7  # Ctrl-C: what was printed, too



class CtrlCAfterLine(io.StringIO):
    """Standard output where Ctrl-C is pressed `presses` times just as the line starting
    with `prefix` is out."""

    def __init__(self, prefix: str, presses: int = 1) -> None:
        super().__init__()
        self.prefix = prefix
        self.presses = presses

    def write(self, text: str) -> int:
        written = super().write(text)
        if text.startswith(self.prefix):
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, here
        return written


@pytest.mark.parametrize("follow", [[], ["--follow"]])
def test_ctrl_c_right_after_a_line_still_commits_it(smq: Run, topic: str, client: Client,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   follow: list[str]) -> None:
    stdout = CtrlCAfterLine("4\t")
    monkeypatch.setattr(sys, "stdout", stdout)
    code = smq("consume", topic, "--consumer", "cut", *follow)[0]
    assert (code, stdout.getvalue()) == (0 if follow else 130, "1\tm1\n2\tm2\n3\tm3\n4\tm4\n")
    assert client.committed_offset("cut", topic) == 4


def test_a_second_ctrl_c_stops_at_once_and_commits_only_counted_lines(smq: Run, topic: str, client: Client,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # As when the write blocks (a pipe nobody reads): the second press must not wait for it.
    stdout = CtrlCAfterLine("4\t", presses=2)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert smq("consume", topic, "--consumer", "twice")[0] == 130
    assert stdout.getvalue().endswith("4\tm4\n")
    assert client.committed_offset("twice", topic) == 3  # line 4 comes again: at least once

# -- smq info ---------------------------------------------------------------------------------

def test_info(smq: Run, server: ServerProcess, topic: str) -> None:
    code, out, err = smq("info")
    assert (code, err) == (0, "")
    fields = dict(line.split("  ", 1) for line in out.splitlines())
    assert {key: value.strip() for key, value in fields.items() if key in (
        "server", "version", "durability", "max message size")} == {
        "server": f"127.0.0.1:{server.port}", "version": "0.1.0", "durability": "full",
        "max message size": "1MiB"}
    assert set(fields) == {"server", "version", "durability", "max message size", "uptime",
                           "topics", "stored messages", "stored bytes", "commits",
                           "committed writes", "committed messages"}
    record = json.loads(smq("info", "--json")[1])
    assert record["target"] == f"127.0.0.1:{server.port}" and record["max_message_size"] == 1024**2
    assert record["stored_messages"] >= 5 and record["uptime"] > 0 and record["commits"] > 0


def test_info_of_a_server_that_is_down(smq: Run) -> None:
    code, out, err = smq("info", "--port", "1", "--timeout", "2")
    assert (code, out) == (1, "") and "cannot reach the SMQ server" in err
    assert "--host/--port" in err


# -- help --------------------------------------------------------------------------------

def run_smq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smq", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def test_help_lists_and_shows_examples_for_the_new_commands() -> None:
    top = run_smq("--help").stdout
    for command in ("topic policy NAME", "consumer list|get|commit|delete", "info", "--consumer NAME"):
        assert command in top
    for command in (["topic", "policy"], ["consumer"], ["consumer", "list"], ["consumer", "get"],
                    ["consumer", "commit"], ["consumer", "delete"], ["info"]):
        result = run_smq(*command, "--help")
        assert result.returncode == 0 and "examples:\n  smq " in result.stdout, command
    assert "--consumer NAME" in run_smq("consume", "--help").stdout


@pytest.mark.parametrize("args", [["topic", "policy", "--help"], ["consumer", "--help"],
                                  ["consumer", "commit", "--help"], ["info", "--help"]])
def test_help_does_not_load_grpc(args: list[str]) -> None:
    code = ("import sys; from smq import cli\n"
            "try: cli.main(sys.argv[1:])\n"
            "except SystemExit: pass\n"
            "assert 'grpc' not in sys.modules, 'grpc imported'\n")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
