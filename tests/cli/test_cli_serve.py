"""The `python -m smq` command end to end: help, exit codes, one-line errors before
anything is opened or bound, and serving from flags, environment or a .env file."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from support.servers import ServerProcess, clean_env
from smq._proto import smq_pb2
from smq.server.config import SETTINGS, SETTINGS_BY_FIELD, ServerConfig as Config

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

TIMEOUT = 60


def run_smq(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m smq args` to completion; returns (exit code, stdout + stderr)."""
    result = subprocess.run([sys.executable, "-m", "smq", *args], cwd=cwd, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=TIMEOUT)
    return result.returncode, result.stdout


def db_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".db" in p.name)


# -- --help ---------------------------------------------------------------------------------

def help_entries(text: str) -> dict[str, str]:
    """argparse's option list as {flag: its whole help text on one line}."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (--[a-z0-9-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(body.split()) for flag, body in entries.items()}


def shown_default(field: str) -> str:
    """The default as --help shows it: as a user writes it, and what Config holds."""
    setting = SETTINGS_BY_FIELD[field]
    assert setting.default_value() == getattr(Config(), field)
    return setting.default or "none"


def test_help_lists_every_flag_with_its_environment_variable_and_default(tmp_path: Path):
    code, out = run_smq("--help", cwd=tmp_path)
    assert code == 0, out
    entries = help_entries(out)
    missing = [s.flag for s in SETTINGS if s.flag not in entries]
    assert not missing, f"flags missing from --help: {missing}\n{out}"
    for setting in SETTINGS:
        entry = entries[setting.flag]
        assert f"env {setting.env}" in entry, entry
        assert f"default {shown_default(setting.field)}" in entry, entry
    assert "default ./dbtest.db" in entries["--dbpath"]
    assert "default 8097" in entries["--port"]
    assert "default true" in entries["--allow-remote-writes"]
    assert db_files(tmp_path) == []


def test_serve_help_is_the_same(tmp_path: Path):
    assert run_smq("serve", "--help", cwd=tmp_path) == run_smq("--help", cwd=tmp_path)


# -- invalid values: one line, exit 2, nothing opened or bound ---------------------------------

INVALID_RUNS = {
    "port flag": (["--port", "abc"], {}, None, ("--port", "'abc'")),
    "port out of range": (["--port", "70000"], {}, None, ("--port", "'70000'")),
    "bool flag": (["--allow-remote-writes=maybe"], {}, None, ("--allow-remote-writes", "'maybe'")),
    "server mtls bool": (["--server-enable-mtls=perhaps"], {}, None,
                         ("--server-enable-mtls", "'perhaps'")),
    "durability": (["--durability", "fast"], {}, None, ("--durability", "'fast'")),
    "shutdown grace": (["--shutdown-grace", "-1"], {}, None, ("--shutdown-grace", "'-1'")),
    "port env": ([], {"PORT": "eighty"}, None, ("PORT", "'eighty'", "environment")),
    "bool env": ([], {"ALLOW_REMOTE_WRITES": "maybe"}, None, ("ALLOW_REMOTE_WRITES", "'maybe'")),
    "smq env": ([], {"SMQ_MAX_STREAMS": "0"}, None, ("SMQ_MAX_STREAMS", "'0'")),
    "dot env file": ([], {}, "PORT=x\n", ("PORT", "'x'", ".env file")),
    "empty dbpath flag": (["--dbpath", ""], {}, None, ("--dbpath", "''")),
    "empty dbpath env": ([], {"DB_PATH": ""}, None, ("DB_PATH", "''", "environment")),
    "mtls without files": (["--server-enable-mtls"], {}, None, ("--server-cert", "SERVER_CERT_FILE")),
    "mtls env without key": ([], {"SERVER_ENABLE_MTLS": "true", "SERVER_CERT_FILE": "s.crt",
                                  "SERVER_CA_CERT_FILE": "ca.crt"}, None, ("SERVER_KEY_FILE",)),
    "missing env file flag": (["--env-file", "nope.env"], {}, None, ("--env-file", "'nope.env'")),
    "missing env file env": ([], {"SMQ_ENV_FILE": "gone.env"}, None, ("SMQ_ENV_FILE", "'gone.env'")),
    "unknown socket group": (["--unix-socket", "s.sock", "--unix-socket-group", "no-such-group-x"],
                             {}, None, ("--unix-socket-group", "'no-such-group-x'", "no such group")),
    "socket group env without socket": ([], {"SMQ_UNIX_SOCKET_GROUP": "0"}, None,
                                        ("SMQ_UNIX_SOCKET_GROUP", "--unix-socket")),
}


def check_one_line_refusal(code: int, out: str, *mentions: str) -> None:
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("smq: error: "), out
    assert "Traceback" not in out
    assert "serving on" not in out
    for text in mentions:
        assert text in lines[0], (text, out)


@pytest.mark.parametrize("case", sorted(INVALID_RUNS))
def test_invalid_setting_refused_in_one_line_before_opening_anything(case: str, tmp_path: Path):
    args, env, dot_env, mentions = INVALID_RUNS[case]
    if dot_env is not None:
        (tmp_path / ".env").write_text(dot_env)
    code, out = run_smq(*args, "--bind", "127.0.0.1", cwd=tmp_path, env=clean_env(**env))
    check_one_line_refusal(code, out, *mentions)
    assert db_files(tmp_path) == []  # not even the default ./dbtest.db


def test_invalid_value_with_explicit_dbpath_creates_no_file(tmp_path: Path):
    db = tmp_path / "data" / "q.db"
    db.parent.mkdir()
    code, out = run_smq("serve", "--dbpath", str(db), "--port", "0", "--workers", "none",
                        cwd=tmp_path)
    check_one_line_refusal(code, out, "--workers", "'none'")
    assert list(db.parent.iterdir()) == []


def test_unusable_database_path_refused_in_one_line(tmp_path: Path):
    code, out = run_smq("--dbpath", str(tmp_path / "no" / "such" / "dir" / "q.db"), "--port", "0",
                        "--bind", "127.0.0.1", cwd=tmp_path)
    check_one_line_refusal(code, out, str(tmp_path / "no" / "such" / "dir"))


def test_port_in_use_refused_with_exit_2(start_server, tmp_path: Path):
    """Not a setting's value, so not held to one line (the database is opened before the
    port is bound, and grpc logs its own line), but one clear error and exit code 2."""
    first = start_server()
    code, out = run_smq("--dbpath", str(tmp_path / "second.db"), "--port", str(first.port),
                        "--bind", "127.0.0.1", cwd=tmp_path)
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("smq: error: ")]
    assert len(errors) == 1 and f"127.0.0.1:{first.port}" in errors[0], out
    assert "Traceback" not in out and "serving on" not in out
    first.stub().Connect(smq_pb2.ConnectRequest(), timeout=10)  # the first one is unharmed


def test_unknown_flag_is_a_usage_error(tmp_path: Path):
    code, out = run_smq("--no-such-flag", cwd=tmp_path)
    assert code == 2
    assert "--no-such-flag" in out and "Traceback" not in out
    assert db_files(tmp_path) == []


# -- serving --------------------------------------------------------------------------------

def produce_one(server: ServerProcess) -> int:
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"), timeout=10)
    return stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x"), timeout=10).offset


def test_only_flags_serves_and_flags_beat_the_environment(tmp_path: Path):
    db = tmp_path / "flags.db"
    env = clean_env(DB_PATH=str(tmp_path / "env.db"), PORT="1", SMQ_BIND="256.0.0.1")
    server = ServerProcess(["--dbpath", str(db), "--port", "0", "--bind", "127.0.0.1"], tmp_path, env)
    try:
        server.wait_serving()
        assert produce_one(server) == 1
        assert db.exists() and not (tmp_path / "env.db").exists()
        assert server.terminate() == 0
    finally:
        server.close()


def test_serve_subcommand_serves(tmp_path: Path):
    db = tmp_path / "serve.db"
    server = ServerProcess(["serve", "--port", "0", "--dbpath", str(db), "--bind", "127.0.0.1"],
                           tmp_path)
    try:
        server.wait_serving()
        assert produce_one(server) == 1
        assert db.exists()
        assert server.terminate() == 0
    finally:
        server.close()


def test_default_dbpath_is_dbtest_db_in_the_working_directory(tmp_path: Path):
    server = ServerProcess(["--port", "0", "--bind", "127.0.0.1"], tmp_path)
    try:
        server.wait_serving()
        produce_one(server)
        assert (tmp_path / "dbtest.db").exists()
        assert server.terminate() == 0
    finally:
        server.close()


def test_environment_only_serves(tmp_path: Path):
    db = tmp_path / "env.db"
    env = clean_env(DB_PATH=str(db), PORT="0", SMQ_BIND="127.0.0.1", ALLOW_REMOTE_WRITES="false")
    server = ServerProcess([], tmp_path, env)
    try:
        server.wait_serving()
        assert db.exists()
        with pytest.raises(grpc.RpcError) as info:
            produce_one(server)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.close()


def test_dot_env_file_serves_and_flags_and_environment_win(tmp_path: Path):
    (tmp_path / ".env").write_text(
        f"DB_PATH={tmp_path / 'file.db'}\nPORT=1\nSMQ_BIND=127.0.0.1\nALLOW_REMOTE_WRITES=false\n")
    env = clean_env(PORT="0")  # the environment beats the file's port 1 (which would fail)
    server = ServerProcess(["--dbpath", str(tmp_path / "flag.db")], tmp_path, env)
    try:
        server.wait_serving()
        assert (tmp_path / "flag.db").exists()
        assert not (tmp_path / "file.db").exists()
        with pytest.raises(grpc.RpcError) as info:  # the file's ALLOW_REMOTE_WRITES applies
            produce_one(server)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.close()


def test_allow_remote_writes_flag_overrides_environment(start_server):
    server = start_server("--allow-remote-writes", env=clean_env(ALLOW_REMOTE_WRITES="false"))
    assert produce_one(server) == 1
    denied = start_server("--allow-remote-writes=false", db=server.log_path.parent / "other.db")
    with pytest.raises(grpc.RpcError) as info:
        produce_one(denied)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("args", [
    ["--enable-mtls=false", "--client-cert", "c.crt", "--client-key", "c.key", "--ca-cert", "ca.crt"],
    ["--enable-mtls"],
])
def test_original_client_side_flags_are_accepted(args: list[str], start_server):
    """The original `smq` parsed its client flags too; scripts passing them keep working."""
    server = start_server(*args)
    assert produce_one(server) == 1


def test_a_storm_of_signals_never_hangs_the_server(tmp_path: Path):
    """Signal handlers run between any two bytecodes of the main thread, also while it
    holds a lock: a handler that took one (Event.set) deadlocked the server on SIGTERM
    (seen by py-spy under the benchmark). 3,000 SIGHUPs, then SIGTERM: it must exit 0."""
    import os
    import signal
    import time

    server = ServerProcess(["--dbpath", str(tmp_path / "q.db"), "--port", "0", "--bind",
                            "127.0.0.1"], tmp_path).wait_serving()
    try:
        for _ in range(3000):
            os.kill(server.proc.pid, signal.SIGHUP)
            time.sleep(0.0002)
        assert produce_one(server) == 1  # still serving
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.close()
