"""`smq forward` settings and command line, without any server: precedence, defaults
derived from the node name, one-line errors with exit code 2 (also for a missing
nats-py), --help, the pure helpers, and the systemd unit and its settings file."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT
from support.certs import make_certs
from support.forwarding import ForwarderProcess, forward_env
from smq.errors import ConfigError
from smq.forward.config import SETTINGS, ForwardConfig, default_node, load
from smq.forward.pacing import RateLimit
from smq.forward.plan import ForwardedTopic
from smq.forward.jetstream import describe, pattern_within, subject_matches

UNIT = ROOT / "systemd" / "smq-forward.service"
SERVER_UNIT = ROOT / "systemd" / "smq.service"


def run_forward(*args: str, cwd: Path, env: dict[str, str] | None = None,
                code: str = "") -> tuple[int, str]:
    """`python -m smq.forward args` (after `code`, if any); (exit code, stdout + stderr)."""
    command = [sys.executable, "-m", "smq.forward", *args] if not code else \
        [sys.executable, "-c", f"{code}\nimport sys\nfrom smq.forward import main\n"
                               f"sys.exit(main(sys.argv[1:]))", *args]
    result = subprocess.run(command, cwd=cwd, env=env or forward_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    return result.returncode, result.stdout


# -- load() -------------------------------------------------------------------------------------

def test_defaults_follow_the_node_name():
    config = load({"topics": "a,b,a"}, environ={}, hostname="edge-17.example.com")
    assert config.topics == ("a", "b")
    assert (config.node, config.stream, config.consumer) == ("edge-17", "SMQ_edge-17", "forward-edge-17")
    assert config.nats_servers == ("nats://localhost:4222",)
    assert (config.window, config.ack_timeout, config.duplicate_window) == (256, 10.0, 120.0)
    named = load({"topics": "a", "node": "n1", "stream": "EDGE", "consumer": "c"}, environ={})
    assert (named.node, named.stream, named.consumer) == ("n1", "EDGE", "c")


def test_flags_beat_environment_beat_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SMQ_FORWARD_TOPICS=from-file\nSMQ_FORWARD_WINDOW=7\n"
                                   "NATS_URL=nats://file:4222\nPORT=1000\n")
    environ = {"SMQ_FORWARD_WINDOW": "8", "NATS_URL": "nats://a:4222, tls://b:4443"}
    config = load({"window": "9"}, environ=environ, hostname="h")
    assert config.topics == ("from-file",)
    assert config.window == 9
    assert config.nats_servers == ("nats://a:4222", "tls://b:4443")
    assert config.port == 1000
    assert load({}, environ=environ, hostname="h").window == 8


def test_the_metrics_port_is_off_unless_given_and_on_loopback_unless_told():
    config = load({"topics": "t"}, environ={}, hostname="h")
    assert (config.metrics_port, config.metrics_bind) == (None, "127.0.0.1")
    assert ForwardConfig().metrics_port is None  # as built in code, too: off
    for off in ("", "off", " OFF "):
        assert load({"topics": "t"}, {"SMQ_FORWARD_METRICS_PORT": off}, "h").metrics_port is None
    config = load({"topics": "t", "metrics_port": "0", "metrics_bind": ""}, {}, "h")
    assert (config.metrics_port, config.metrics_bind) == (0, "127.0.0.1")  # 0: any free port
    environ = {"SMQ_FORWARD_METRICS_PORT": "9098", "SMQ_FORWARD_METRICS_BIND": "::"}
    config = load({"topics": "t"}, environ, "h")
    assert (config.metrics_port, config.metrics_bind) == (9098, "::")


@pytest.mark.parametrize("flags, environ, setting, reason", [
    ({"topics": ""}, {}, "--topics (SMQ_FORWARD_TOPICS, from command line)", "one or more topic"),
    ({"topics": "a..b"}, {}, "--topics", "no leading, trailing or double dots"),
    ({"topics": "bad name"}, {}, "--topics", "A-Z a-z 0-9 . _ -"),
    ({"topics": "t", "node": "a.b"}, {}, "--node", "one subject token"),
    ({"topics": "t", "window": "0"}, {}, "--window", "from 1 to 10000"),
    ({"topics": "t"}, {"SMQ_FORWARD_WINDOW": "many"}, "--window (SMQ_FORWARD_WINDOW, from environment)",
     "expected a number"),
    ({"topics": "t", "rate_limit": "-1"}, {}, "--rate-limit", "0 (no limit)"),
    ({"topics": "t", "ack_timeout": "0"}, {}, "--ack-timeout", "from 0.1 to 600"),
    ({"topics": "t", "ack_timeout": "soon"}, {}, "--ack-timeout", "duration"),
    ({"topics": "t", "nats_servers": "http://x/y"}, {}, "--nats-servers", "not a NATS URL"),
    ({"topics": "t", "subject_prefix": "a.*"}, {}, "--subject-prefix", "without wildcards"),
    ({"topics": "t", "stream": "a.b"}, {}, "--stream", "stream name"),
    ({"topics": "t", "replicas": "7"}, {}, "--replicas", "from 1 to 5"),
    ({"topics": "t", "start_from": "middle"}, {}, "--start-from", "earliest, latest"),
    ({"topics": "t", "enable_mtls": "true"}, {}, "--client-cert", "required with --enable-mtls"),
    ({"topics": "t", "nats_cert": "/etc/hostname"}, {}, "--nats-key", "go together"),
    ({"topics": "t", "nats_password": "p"}, {}, "--nats-user", "required with --nats-password"),
    ({"topics": "t", "nats_user": "u", "nats_token": "x"}, {}, "--nats-token", "one way"),
    ({"topics": "t", "nats_ca": "/nonexistent/ca.pem"}, {}, "--nats-ca", "no such file"),
    ({"topics": "t"}, {"SMQ_FORWARD_METRICS_PORT": "70000"},
     "--metrics-port (SMQ_FORWARD_METRICS_PORT, from environment)", "from 0 to 65535"),
    ({"topics": "t", "metrics_port": "http"}, {}, "--metrics-port", "expected a number"),
    ({"topics": "t", "metrics_bind": "not an address"}, {}, "--metrics-bind",
     "host name or IP address"),
    ({}, {}, "--topics", "required"),
])
def test_invalid_settings_name_the_setting_and_value(flags, environ, setting, reason):
    with pytest.raises(ConfigError) as info:
        load(flags, environ=environ, hostname="h")
    assert str(info.value).startswith(f"invalid {setting}")
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


# -- secrets from files: --nats-password-file, --nats-token-file --------------------------------

def test_password_and_token_files_are_read_without_their_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    password = tmp_path / "nats-password"
    password.write_text("s3 cr=t \n")  # inner and trailing spaces are part of it
    config = load({"topics": "t", "nats_user": "edge", "nats_password_file": str(password)},
                  environ={}, hostname="h")
    assert (config.nats_user, config.nats_password) == ("edge", "s3 cr=t ")
    token = tmp_path / "nats-token"
    token.write_bytes(b"t0ken\r\n")
    assert load({"topics": "t"}, environ={"NATS_TOKEN_FILE": str(token)},
                hostname="h").nats_token == "t0ken"
    (tmp_path / ".env").write_text(f"NATS_TOKEN_FILE={token}\n")
    assert load({"topics": "t"}, environ={}, hostname="h").nats_token == "t0ken"


def secret_file(tmp_path: Path, content: bytes | None) -> str:
    """A file holding `content` (None: no file, a directory: b"/")."""
    path = tmp_path / "secret"
    if content == b"/":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("content, flags, setting, reason", [
    (None, {"nats_user": "u"}, "--nats-password-file (NATS_PASSWORD_FILE)",
     "cannot be read: No such file or directory"),
    (b"/", {"nats_user": "u"}, "--nats-password-file", "cannot be read: Is a directory"),
    (b"\n", {"nats_user": "u"}, "--nats-password-file", "is empty"),
    (b"Zq9\nline2-Zq9\n", {"nats_user": "u"}, "--nats-password-file", "more than one line"),
    (b"\xffZq9", {"nats_user": "u"}, "--nats-password-file", "not UTF-8"),
    (b"x" * 70_000, {"nats_user": "u"}, "--nats-password-file", "larger than 64 KiB"),
    (b"Zq9", {"nats_user": "u", "nats_password": "Zq9"}, "--nats-password-file",
     "give --nats-password or --nats-password-file, not both"),
    (b"Zq9", {}, "--nats-user", "required with --nats-password-file"),
], ids=["missing", "directory", "empty", "two-lines", "not-utf8", "large", "both", "no-user"])
def test_unusable_password_files_name_the_setting_and_never_the_secret(
        tmp_path, content, flags, setting, reason):
    path = secret_file(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load({"topics": "t", "nats_password_file": path, **flags}, environ={}, hostname="h")
    message = str(info.value)
    assert message.startswith(f"invalid {setting}") and reason in message, message
    assert "Zq9" not in message and "\n" not in message


def test_a_token_given_twice_is_not_shown_in_the_error(tmp_path):
    token = secret_file(tmp_path, b"t0ken\n")
    with pytest.raises(ConfigError, match="give --nats-token or --nats-token-file, not both"):
        load({"topics": "t", "nats_token": "t0ken", "nats_token_file": token}, environ={},
             hostname="h")
    for flags in ({"nats_token": "t0ken"}, {"nats_token_file": token}):
        with pytest.raises(ConfigError, match="one way to authenticate") as info:
            load({"topics": "t", "nats_user": "u", **flags}, environ={}, hostname="h")
        assert "t0ken" not in str(info.value)


@pytest.mark.process
def test_a_missing_password_file_exits_2_with_one_line(tmp_path):
    code, out = run_forward("--topics", "t", "--nats-user", "u", cwd=tmp_path,
                            env=forward_env(NATS_PASSWORD_FILE=str(tmp_path / "nope")))
    assert code == 2
    assert out == ("smq forward: error: invalid --nats-password-file (NATS_PASSWORD_FILE): "
                   f"'{tmp_path / 'nope'}': cannot be read: No such file or directory\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_password_file_is_refused(tmp_path):
    path = secret_file(tmp_path, b"s3cret\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied"):
        load({"topics": "t", "nats_user": "u", "nats_password_file": path}, environ={},
             hostname="h")


# -- start-up warnings about secrets every user can read ----------------------------------------

def warnings_of(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The WARNING lines of a forwarder started with `env`: those before it says it
    starts (no SMQ or NATS to reach: it is stopped then)."""
    forwarder = ForwarderProcess(["--topics", "t", "--node", "edge"], tmp_path, env)
    try:
        forwarder.wait_log(r"smq forward starting", timeout=30)
    finally:
        forwarder.terminate()
    return [line for line in forwarder.log().split("smq forward starting")[0].splitlines()
            if line.startswith("WARNING")]


@pytest.mark.process
def test_keys_and_secret_files_every_user_can_read_are_warned_about(tmp_path):
    certs = make_certs(tmp_path / "certs")
    client_key, nats_key, password = (tmp_path / name for name in ("c.key", "n.key", "pw"))
    client_key.write_bytes(certs.read("client_key"))
    nats_key.write_bytes(certs.read("client_key"))
    password.write_text("s3cret\n")
    for path in (client_key, nats_key, password):
        path.chmod(0o644)
    env = forward_env(ENABLE_MTLS="true", CLIENT_CERT=str(certs.client_cert),
                      CLIENT_KEY=str(client_key), CA_CERT=str(certs.ca_cert),
                      NATS_USER="edge", NATS_PASSWORD_FILE=str(password),
                      NATS_CERT=str(certs.client_cert), NATS_KEY=str(nats_key))
    how = "can be read by every user of this device (mode 0644): chmod 600 it, or have " \
          "systemd pass it with LoadCredential="
    assert sorted(warnings_of(tmp_path, env)) == sorted([
        f"WARNING smq.forward: --client-key (CLIENT_KEY) '{client_key}' {how}",
        f"WARNING smq.forward: --nats-key (NATS_KEY) '{nats_key}' {how}",
        f"WARNING smq.forward: --nats-password-file (NATS_PASSWORD_FILE) '{password}' {how}"])

    for path in (client_key, nats_key, password):
        path.chmod(0o600)
    assert warnings_of(tmp_path, env) == []


@pytest.mark.process
def test_an_env_file_with_a_token_every_user_can_read_is_warned_about(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("NATS_TOKEN=t0ken\n")
    env_file.chmod(0o644)
    (warning,) = warnings_of(tmp_path, forward_env())
    assert warning == ("WARNING smq.forward: settings file '.env' holds NATS_TOKEN and can be "
                       "read by every user of this device (mode 0644): chmod 600 it")


def test_a_host_name_that_is_no_subject_token_asks_for_a_node():
    with pytest.raises(ConfigError, match=r"--node \(SMQ_FORWARD_NODE\), from the host name"):
        load({"topics": "t"}, environ={}, hostname="my_host!")
    assert default_node("edge-1.local") == "edge-1"


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.process
def test_bad_settings_exit_2_with_one_line(tmp_path):
    code, out = run_forward("--topics", "t", "--window", "0", cwd=tmp_path)
    assert code == 2
    assert out == "smq forward: error: invalid --window (SMQ_FORWARD_WINDOW, from command line): " \
                  "'0': expected a value from 1 to 10000\n"
    code, out = run_forward(cwd=tmp_path, env=forward_env(SMQ_FORWARD_TOPICS="a..b"))
    assert code == 2 and len(out.splitlines()) == 1 and "SMQ_FORWARD_TOPICS" in out


@pytest.mark.process
def test_a_metrics_port_that_cannot_be_had_exits_2_with_one_line_before_anything_else(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code, out = run_forward("--topics", "t", "--metrics-port", str(port), cwd=tmp_path)
    assert code == 2
    assert out == f"smq forward: error: cannot listen on 127.0.0.1:{port} for metrics: " \
                  "Address already in use (is another server using it?)\n"
    assert time.monotonic() - started < 15  # no wait for SMQ or NATS (neither runs here)
    code, out = run_forward("--topics", "t", "--metrics-port", "0", "--metrics-bind",
                            "192.0.2.1", cwd=tmp_path)  # TEST-NET-1: no address of this host
    assert code == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("smq forward: error: cannot listen on 192.0.2.1:0 for metrics: ")
    code, out = run_forward("--topics", "t", "--metrics-port", "0", "--metrics-bind",
                            "no-such-host.invalid", cwd=tmp_path)
    assert code == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("smq forward: error: cannot listen on no-such-host.invalid:0 for metrics")


@pytest.mark.process
def test_missing_nats_py_is_one_line_and_exit_2(tmp_path):
    code, out = run_forward("--topics", "t", cwd=tmp_path,
                            code="import sys; sys.modules['nats'] = None  # as if not installed")
    assert code == 2
    assert out == ("smq forward: error: forwarding to NATS needs nats-py, which is not installed: "
                   "pip install nats-py (a dependency of smq; the PEX carries it)\n")


@pytest.mark.process
def test_unusable_nats_tls_files_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    code, out = run_forward("--topics", "t", "--nats-ca", str(bad), cwd=tmp_path)
    assert code == 2 and len(out.splitlines()) == 1
    assert out.startswith("smq forward: error: the NATS TLS files cannot be used: ")


@pytest.mark.process
def test_help_lists_every_flag_with_its_environment_variable(tmp_path):
    code, out = run_forward("--help", cwd=tmp_path)
    assert code == 0
    text = " ".join(out.split())
    for setting in SETTINGS:
        assert re.search(rf"{setting.flag} (VALUE|\[BOOL\])", text), setting.flag
        assert f"env {setting.env}" in text, setting.env
    assert "default 256" in text and "default nats://localhost:4222" in text


def test_nats_py_is_a_dependency_so_the_pex_carries_the_forwarder():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'(?m)^ +"nats-py>=2\.6",', text)
    assert re.search(r"(?m)^nats-py==[\d.]+", (ROOT / "requirements" / "runtime.txt").read_text())


# -- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, subject, matches", [
    ("smq.edge.>", "smq.edge.t", True),
    ("smq.edge.>", "smq.edge.gps.fix", True),
    ("smq.edge.>", "smq.edge", False),
    ("smq.*.t", "smq.edge.t", True),
    ("smq.*.t", "smq.edge.u", False),
    ("smq.edge.t", "smq.edge.t", True),
    ("smq.edge.t", "smq.edge.t.x", False),
    (">", "anything.at.all", True),
])
def test_subject_matching(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


def test_pattern_within_the_node_namespace():
    assert pattern_within("smq.edge.>", "smq.edge.>")
    assert pattern_within("smq.edge.t", "smq.edge.>")
    assert not pattern_within("smq.>", "smq.edge.>")
    assert not pattern_within("smq.*.t", "smq.edge.>")
    assert not pattern_within("smq.edge2.>", "smq.edge.>")


def test_topic_state_backlog_and_ids():
    topic = ForwardedTopic("t", "smq.edge.t", "edge/t/")
    topic.earliest, topic.latest = 5, 20
    assert topic.backlog == 16  # nothing committed: everything stored
    topic.committed = 18
    assert topic.backlog == 2
    assert topic.offset_of("edge/t/42") == 42
    assert topic.offset_of("edge/t2/42") is None and topic.offset_of("x") is None
    assert topic.offset_of(None) is None


def test_rate_limit_paces_acquisitions():
    async def timed(rate: float, count: int) -> float:
        limit = RateLimit(rate)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(count):
            await limit.acquire()
        return loop.time() - started
    assert asyncio.run(timed(0, 1000)) < 0.5          # no limit
    assert 0.35 <= asyncio.run(timed(100, 50)) < 2.0  # 50 at 100/s, after a 0.1 s burst


def test_describe_gives_one_line_for_nats_errors():
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(OSError("nats: no\nservers")) == "OSError: no servers"


# -- the systemd unit ---------------------------------------------------------------------------

def hardening(text: str) -> list[str]:
    return text.split("# Hardening", 1)[1].split("[Install]", 1)[0].splitlines()[1:]


def test_unit_is_hardened_like_the_server_and_waits_for_ready():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecStart=/opt/smq/smq.pex forward",
                 "EnvironmentFile=-/etc/smq/forward.env", "Restart=on-failure",
                 "RestartPreventExitStatus=2", "DynamicUser=yes", "UMask=0077",
                 "TimeoutStartSec=infinity"):
        assert line in text.splitlines(), line
    assert re.search(r"(?m)^WatchdogSec=\d+", text)
    assert hardening(text) == hardening(SERVER_UNIT.read_text())


@pytest.mark.process
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_and_its_exposure_is_as_low_as_the_servers(tmp_path):
    exec_start = f"ExecStart={sys.executable} -m smq.forward"
    unit = tmp_path / "smq-forward.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", exec_start, UNIT.read_text()))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for smq-forward.service: ([\d.]+)", result.stdout)
    assert match and float(match.group(1)) <= 2.0, result.stdout + result.stderr


def test_env_example_lists_every_setting():
    text = (ROOT / "systemd" / "forward.env").read_text()
    for setting in SETTINGS:
        if setting.field != "env_file":
            assert f"#{setting.env}=" in text, setting.env
    assert not [line for line in text.splitlines() if line and not line.startswith("#")]


def test_configuration_page_documents_every_setting():
    page = (ROOT / "docs" / "configuration.md").read_text()
    text = page[page.index("## Forwarder"):]
    rows = " ".join(line for line in text.splitlines() if line.startswith("| `--"))
    for setting in SETTINGS:
        assert f"`{setting.flag}`" in rows and f"`{setting.env}`" in rows or \
            setting.flag in rows and setting.env in rows, setting.flag


def test_forward_config_defaults_match_the_documented_ones():
    config = ForwardConfig()
    assert (config.subject_prefix, config.start_from, config.rate_limit) == ("smq", "earliest", 0.0)
