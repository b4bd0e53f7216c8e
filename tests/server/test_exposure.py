"""Start-up warnings of a real server process about what it leaves open: its private
key or its .env file with a secret readable by every user, and plaintext TCP writes
open to anyone who can reach the port (silenced by --quiet-open-network). One WARNING
line each, before the "serving on" line that the tests wait for; none for a server that
leaves nothing open. smq.exposure's helpers too."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.certs import CertSet, make_certs
from support.servers import clean_env
from smq import exposure

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

OPEN = re.compile(r"^WARNING smq\.server\.app: serving plaintext TCP on 0\.0\.0\.0:(\d+) with "
                  r"remote writes allowed: anyone who can reach port (\d+) may write and delete "
                  r"\(to close it: --bind 127\.0\.0\.1, --server-enable-mtls or "
                  r"--allow-remote-writes=false; to silence this warning: --quiet-open-network\)$")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("WARNING")]


# -- TCP writes open to the network ------------------------------------------------------

def test_plaintext_writes_on_every_address_are_warned_about_once(start_server):
    server = start_server("--bind", "0.0.0.0")
    (warning,) = warnings_in(server.log())
    match = OPEN.match(warning)
    assert match, warning
    assert match.group(1) == match.group(2) == str(server.port)


@pytest.mark.parametrize("flags, env", [
    (["--quiet-open-network"], {}),
    (["--quiet-open-network=true"], {}),
    ([], {"SMQ_QUIET_OPEN_NETWORK": "true"}),
    (["--allow-remote-writes=false"], {}),
    (["--bind", "127.0.0.1"], {}),
    (["--bind", "localhost"], {}),
], ids=["flag", "flag=true", "environment", "no-remote-writes", "loopback", "localhost"])
def test_no_warning_when_silenced_or_closed(flags, env, start_server):
    bind = [] if "--bind" in flags else ["--bind", "0.0.0.0"]
    server = start_server(*bind, *flags, env=clean_env(**env))
    assert warnings_in(server.log()) == []


def test_silenced_from_the_env_file(start_server, tmp_path: Path):
    (tmp_path / ".env").write_text("SMQ_QUIET_OPEN_NETWORK=yes\n")  # the server's cwd
    server = start_server("--bind", "0.0.0.0")
    assert "serving on 0.0.0.0:" in server.log()
    assert warnings_in(server.log()) == []


def test_mtls_on_every_address_with_a_private_key_warns_about_nothing(start_server,
                                                                       certs: CertSet):
    server = start_server("--bind", "0.0.0.0", *certs.server_flags())
    assert "mTLS" in server.log()
    assert warnings_in(server.log()) == []


# -- secrets other users can read --------------------------------------------------------

def test_a_key_readable_by_every_user_is_warned_about(start_server, certs: CertSet,
                                                      tmp_path: Path):
    key = tmp_path / "server.key"
    key.write_bytes(certs.read("server_key"))
    key.chmod(0o644)
    flags = certs.server_flags()
    flags[flags.index(str(certs.server_key))] = str(key)
    server = start_server(*flags)
    assert warnings_in(server.log()) == [
        f"WARNING smq.server.app: --server-key (SERVER_KEY_FILE) '{key}' can be read by every "
        "user of this device (mode 0644): chmod 600 it, or have systemd pass it with "
        "LoadCredential="]
    key.chmod(0o640)  # group-readable: not looked at
    server.terminate()
    assert warnings_in(start_server(*flags).log()) == []


def test_an_env_file_with_a_secret_readable_by_every_user_is_warned_about(start_server,
                                                                           tmp_path: Path):
    env_file = tmp_path / "shared.env"
    env_file.write_text("SMQ_LOG_LEVEL=info\nNATS_PASSWORD=s3cret\nNATS_TOKEN=\n")
    env_file.chmod(0o644)
    server = start_server("--env-file", str(env_file))
    (warning,) = warnings_in(server.log())
    assert warning == (f"WARNING smq.server.app: settings file '{env_file}' holds NATS_PASSWORD "
                       "and can be read by every user of this device (mode 0644): chmod 600 it")
    assert "s3cret" not in server.log()
    server.terminate()

    env_file.chmod(0o600)
    server = start_server("--env-file", str(env_file))
    assert warnings_in(server.log()) == []
    server.terminate()
    env_file.write_text("SMQ_LOG_LEVEL=info\nNATS_PASSWORD_FILE=/etc/smq/nats-password\n")
    env_file.chmod(0o644)  # no secret in it: nothing to say
    assert warnings_in(start_server("--env-file", str(env_file)).log()) == []


# -- the helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.20", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback(host: str, loopback: bool):
    assert exposure.is_loopback(host) is loopback


def test_mode_if_others_read(tmp_path: Path):
    path = tmp_path / "f"
    path.write_text("x")
    for mode, seen in ((0o600, None), (0o640, None), (0o604, 0o604), (0o444, 0o444)):
        path.chmod(mode)
        assert exposure.mode_if_others_read(str(path)) == seen
    assert exposure.mode_if_others_read(str(tmp_path / "missing")) is None
