"""The settings tables' load(flags, environ): the server's (smq.server.config) and the
clients' connection (smq.connection): defaults, precedence flags > environment > .env
file > defaults under the original names, boolean spellings, and errors that name the
setting and the value. No process is started here; see test_cli.py for the command."""
from __future__ import annotations

from pathlib import Path

import pytest

from smq import connection
from smq.cli.serve import serve_parser
from smq.errors import ConfigError, StartupError
from smq.server.config import SETTINGS, ServerConfig as Config, load

# Both tables by field (the port is in both, the same setting).
SETTINGS_BY_FIELD = {s.field: s for s in connection.SETTINGS + SETTINGS}


def load_for(field: str):
    """The load of the table that holds `field`: the server's, else the connection's."""
    return load if field in {s.field for s in SETTINGS} else connection.load


def default_for(field: str):
    return getattr(Config() if load_for(field) is load else connection.ConnectionConfig(), field)


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in an empty directory, so no stray .env file is read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_env_file(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


# -- defaults ------------------------------------------------------------------------

def test_defaults_are_the_originals():
    config = load({}, {})
    assert config == Config()
    assert config.dbpath == "./dbtest.db"
    assert config.port == 8097
    assert config.allow_remote_writes is True
    assert config.server_enable_mtls is False
    assert (config.server_cert, config.server_key, config.server_ca_cert) == ("", "", "")
    assert config.durability == "full"
    client = connection.load({}, {})
    assert client == connection.ConnectionConfig()
    assert (client.host, client.port, client.enable_mtls) == ("localhost", 8097, False)
    assert (client.client_cert, client.client_key, client.ca_cert) == ("", "", "")


ORIGINAL_NAMES = {
    "dbpath": ("--dbpath", "DB_PATH"),
    "port": ("--port", "PORT"),
    "server_enable_mtls": ("--server-enable-mtls", "SERVER_ENABLE_MTLS"),
    "server_cert": ("--server-cert", "SERVER_CERT_FILE"),
    "server_key": ("--server-key", "SERVER_KEY_FILE"),
    "server_ca_cert": ("--server-ca-cert", "SERVER_CA_CERT_FILE"),
    "allow_remote_writes": ("--allow-remote-writes", "ALLOW_REMOTE_WRITES"),
    "enable_mtls": ("--enable-mtls", "ENABLE_MTLS"),
    "client_cert": ("--client-cert", "CLIENT_CERT"),
    "client_key": ("--client-key", "CLIENT_KEY"),
    "ca_cert": ("--ca-cert", "CA_CERT"),
}


@pytest.mark.parametrize("field", sorted(ORIGINAL_NAMES))
def test_original_flag_and_environment_names(field: str):
    setting = SETTINGS_BY_FIELD[field]
    assert (setting.flag, setting.env) == ORIGINAL_NAMES[field]


def test_additions_are_prefixed_smq():
    for setting in SETTINGS_BY_FIELD.values():
        if setting.field not in ORIGINAL_NAMES:
            assert setting.env.startswith("SMQ_"), setting


# -- precedence ------------------------------------------------------------------------

# field -> raw text for (flag, environment, .env file) and the values they parse to.
LAYERS = {
    "dbpath": (("flag.db", "env.db", "file.db"), ("flag.db", "env.db", "file.db")),
    "port": (("9001", "9002", "9003"), (9001, 9002, 9003)),
    "server_cert": (("f.crt", "e.crt", "d.crt"), ("f.crt", "e.crt", "d.crt")),
    "server_key": (("f.key", "e.key", "d.key"), ("f.key", "e.key", "d.key")),
    "server_ca_cert": (("f-ca", "e-ca", "d-ca"), ("f-ca", "e-ca", "d-ca")),
    "allow_remote_writes": (("false", "true", "false"), (False, True, False)),
    "acl_file": (("f.toml", "e.toml", "d.toml"), ("f.toml", "e.toml", "d.toml")),
    "quiet_open_network": (("true", "false", "yes"), (True, False, True)),
    "enable_mtls": (("true", "false", "yes"), (True, False, True)),
    "client_cert": (("f.crt", "e.crt", "d.crt"), ("f.crt", "e.crt", "d.crt")),
    "client_key": (("f.key", "e.key", "d.key"), ("f.key", "e.key", "d.key")),
    "ca_cert": (("f-ca", "e-ca", "d-ca"), ("f-ca", "e-ca", "d-ca")),
    "durability": (("normal", "full", "normal"), ("normal", "full", "normal")),
    "max_streams": (("3", "4", "5"), (3, 4, 5)),
    "workers": (("2", "3", "4"), (2, 3, 4)),
    "shutdown_grace": (("1s", "250ms", "3"), (1.0, 0.25, 3.0)),
    "heartbeat_interval": (("2", "3s", "1m"), (2.0, 3.0, 60.0)),
    "max_message_size": (("1KiB", "2048", "1MiB"), (1024, 2048, 1024**2)),
    "memory_budget": (("64MiB", "100m", "1GiB"), (64 * 1024**2, 100 * 1024**2, 1024**3)),
    "stall_timeout": (("5s", "2m", "90"), (5.0, 120.0, 90.0)),
    "bind": (("127.0.0.1", "::1", "localhost"), ("127.0.0.1", "::1", "localhost")),
    "log_level": (("debug", "warning", "error"), ("debug", "warning", "error")),
}


@pytest.mark.parametrize("field", sorted(LAYERS))
def test_precedence_flag_over_environment_over_env_file_over_default(field: str, empty_cwd: Path):
    (flag_raw, env_raw, file_raw), (flag_value, env_value, file_value) = LAYERS[field]
    name = SETTINGS_BY_FIELD[field].env
    default = default_for(field)
    load = load_for(field)
    assert getattr(load({}, {}), field) == default

    write_env_file(empty_cwd / ".env", **{name: file_raw})
    assert getattr(load({}, {}), field) == file_value
    assert getattr(load({field: None}, {}), field) == file_value  # None: flag not given
    assert getattr(load({}, {name: env_raw}), field) == env_value
    assert getattr(load({field: flag_raw}, {name: env_raw}), field) == flag_value

    (empty_cwd / ".env").unlink()
    assert getattr(load({}, {name: env_raw}), field) == env_value
    assert getattr(load({field: flag_raw}, {}), field) == flag_value


def test_server_enable_mtls_precedence(empty_cwd: Path):
    files = {"server_cert": "s.crt", "server_key": "s.key", "server_ca_cert": "ca.crt"}
    assert load(files, {}).server_enable_mtls is False
    write_env_file(empty_cwd / ".env", SERVER_ENABLE_MTLS="true")
    assert load(files, {}).server_enable_mtls is True
    assert load(files, {"SERVER_ENABLE_MTLS": "false"}).server_enable_mtls is False
    assert load({**files, "server_enable_mtls": "true"},
                {"SERVER_ENABLE_MTLS": "false"}).server_enable_mtls is True
    write_env_file(empty_cwd / ".env", SERVER_ENABLE_MTLS="false")
    assert load(files, {"SERVER_ENABLE_MTLS": "on"}).server_enable_mtls is True


def test_layers_mix_per_setting(empty_cwd: Path):
    """Each setting is taken from the highest layer that has it, independently."""
    write_env_file(empty_cwd / ".env", DB_PATH="file.db", PORT="7003", ALLOW_REMOTE_WRITES="false")
    config = load({"dbpath": "flag.db"}, {"PORT": "7002"})
    assert (config.dbpath, config.port, config.allow_remote_writes) == ("flag.db", 7002, False)
    assert config.durability == "full"


def test_load_does_not_read_the_process_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("DB_PATH", "leaked.db")
    config = load({}, {})
    assert (config.port, config.dbpath) == (8097, "./dbtest.db")


def test_load_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PORT", "1234")
    assert load({}).port == 1234


# -- the env file ------------------------------------------------------------------------

def test_env_file_from_smq_env_file_replaces_dot_env(empty_cwd: Path):
    write_env_file(empty_cwd / ".env", PORT="7001", DB_PATH="dot.db")
    other = write_env_file(empty_cwd / "other.env", PORT="7002")
    config = load({}, {"SMQ_ENV_FILE": str(other)})
    assert config.port == 7002
    assert config.dbpath == "./dbtest.db"  # .env is not read as well


def test_env_file_flag_beats_smq_env_file(empty_cwd: Path):
    by_env = write_env_file(empty_cwd / "by-env.env", PORT="7002")
    by_flag = write_env_file(empty_cwd / "by-flag.env", PORT="7003")
    config = load({"env_file": str(by_flag)}, {"SMQ_ENV_FILE": str(by_env)})
    assert config.port == 7003


def test_env_file_is_below_the_environment(empty_cwd: Path):
    env_file = write_env_file(empty_cwd / "s.env", PORT="7003", DB_PATH="file.db")
    config = load({"env_file": str(env_file)}, {"PORT": "7002"})
    assert (config.port, config.dbpath) == (7002, "file.db")


def test_env_file_relative_to_the_working_directory(empty_cwd: Path):
    (empty_cwd / "conf").mkdir()
    write_env_file(empty_cwd / "conf" / "smq.env", ALLOW_REMOTE_WRITES="no")
    assert load({"env_file": "conf/smq.env"}, {}).allow_remote_writes is False


def test_env_file_with_comments_quotes_and_export(empty_cwd: Path):
    (empty_cwd / ".env").write_text(
        "# SMQ settings\n"
        "export DB_PATH='/data/q.db'\n"
        'PORT="7005"  # inline comment\n'
        "\n"
        "ALLOW_REMOTE_WRITES=off\n")
    config = load({}, {})
    assert (config.dbpath, config.port, config.allow_remote_writes) == ("/data/q.db", 7005, False)


def test_missing_default_env_file_is_fine():
    assert load({}, {}) == Config()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_missing_explicit_env_file_is_an_error(how: str, empty_cwd: Path):
    missing = str(empty_cwd / "nope.env")
    with pytest.raises(ConfigError) as info:
        if how == "flag":
            load({"env_file": missing}, {})
        else:
            load({}, {"SMQ_ENV_FILE": missing})
    message = str(info.value)
    assert missing in message and "--env-file" in message and "SMQ_ENV_FILE" in message
    assert "\n" not in message


def test_env_file_that_is_a_directory_is_an_error(empty_cwd: Path):
    (empty_cwd / "dir.env").mkdir()
    with pytest.raises(ConfigError) as info:
        load({"env_file": "dir.env"}, {})
    assert "dir.env" in str(info.value)


# -- booleans ------------------------------------------------------------------------------

TRUE_SPELLINGS = ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", "t", "y", " true "]
FALSE_SPELLINGS = ["false", "False", "FALSE", "no", "No", "off", "OFF", "0", "f", "n"]


@pytest.mark.parametrize("text,expected", [(t, True) for t in TRUE_SPELLINGS]
                         + [(t, False) for t in FALSE_SPELLINGS])
def test_boolean_spellings(text: str, expected: bool, empty_cwd: Path):
    assert load({"allow_remote_writes": text}, {}).allow_remote_writes is expected
    assert load({}, {"ALLOW_REMOTE_WRITES": text}).allow_remote_writes is expected
    assert connection.load({}, {"ENABLE_MTLS": text}).enable_mtls is expected
    write_env_file(empty_cwd / ".env", ALLOW_REMOTE_WRITES=text.strip())
    assert load({}, {}).allow_remote_writes is expected


@pytest.mark.parametrize("argv,expected", [
    ([], True),
    (["--allow-remote-writes"], True),
    (["--allow-remote-writes=true"], True),
    (["--allow-remote-writes=false"], False),
    (["--allow-remote-writes", "false"], False),
    (["--allow-remote-writes=no"], False),
    (["--allow-remote-writes=0"], False),
    (["--allow-remote-writes=off"], False),
])
def test_boolean_flag_forms_through_the_parser(argv: list[str], expected: bool):
    parsed = vars(serve_parser().parse_args(argv))
    # A typed flag must also win over the opposite value in the environment.
    environ = {"ALLOW_REMOTE_WRITES": str(not expected).lower()} if argv else {}
    assert load(parsed, environ).allow_remote_writes is expected


def test_bare_boolean_flag_followed_by_another_flag():
    parsed = serve_parser().parse_args(
        ["--server-enable-mtls", "--server-cert", "s.crt", "--server-key", "s.key",
         "--server-ca-cert", "ca.crt"])
    config = load(vars(parsed), {"SERVER_ENABLE_MTLS": "false"})
    assert config.server_enable_mtls is True
    assert (config.server_cert, config.server_key, config.server_ca_cert) == ("s.crt", "s.key", "ca.crt")


def test_parser_defaults_are_none_so_they_never_override():
    parsed = vars(serve_parser().parse_args([]))
    assert {k: v for k, v in parsed.items() if v is not None} == {}
    assert load(parsed, {"PORT": "7777", "DB_PATH": "e.db"}).port == 7777


# -- invalid values --------------------------------------------------------------------------

INVALID = [
    ("port", "abc"), ("port", "70000"), ("port", "-1"), ("port", "80.5"), ("port", ""),
    ("allow_remote_writes", "maybe"), ("allow_remote_writes", ""),
    ("server_enable_mtls", "enabled"), ("enable_mtls", "sure"),
    ("durability", "fast"), ("max_streams", "0"), ("max_streams", "many"),
    ("max_consumers_per_topic", "0"), ("max_consumers_per_topic", "many"),
    ("health_check_interval", "0"), ("health_check_interval", "often"),
    ("unix_socket_group", "no-such-group-x"), ("unix_socket_group", "4294967295"),
    ("workers", "0"), ("heartbeat_interval", "soon"), ("heartbeat_interval", "0"),
    ("shutdown_grace", "-1"), ("shutdown_grace", "10 parsecs"),
    ("max_message_size", "1TB"), ("max_message_size", "0"), ("log_level", "verbose"),
    ("bind", "not a host!"), ("host", "bad host"), ("port", "80\n81"),
    ("dbpath", ""), ("dbpath", "  "), ("dbpath", ":memory:"),
    ("memory_budget", "8MiB"), ("memory_budget", "lots"), ("memory_budget", "1TB"),
    ("stall_timeout", "0"), ("stall_timeout", "2h"),
    ("max_db_size", "1"), ("max_db_size", "1KiB"),
]


def check_names_setting_and_value(exc: ConfigError, field: str, raw: str, source: str) -> None:
    setting = SETTINGS_BY_FIELD[field]
    message = str(exc)
    assert setting.flag in message and setting.env in message, message
    assert repr(raw) in message, message
    assert source in message, message
    assert "\n" not in message
    assert "e+" not in message  # bounds as users write them: 67108864, not 6.71089e+07
    assert exc.value == raw


@pytest.mark.parametrize("field,raw", INVALID)
def test_invalid_flag_value_names_setting_and_value(field: str, raw: str):
    with pytest.raises(ConfigError) as info:
        load_for(field)({field: raw}, {})
    check_names_setting_and_value(info.value, field, raw, "command line")


@pytest.mark.parametrize("field,raw", INVALID)
def test_invalid_environment_value_names_setting_and_value(field: str, raw: str):
    with pytest.raises(ConfigError) as info:
        load_for(field)({}, {SETTINGS_BY_FIELD[field].env: raw})
    check_names_setting_and_value(info.value, field, raw, "environment")


# (an unquoted .env value cannot hold a newline, and its outer spaces are dropped)
@pytest.mark.parametrize("field,raw", [(f, r) for f, r in INVALID if r == r.strip() and "\n" not in r])
def test_invalid_env_file_value_names_setting_and_value(field: str, raw: str, empty_cwd: Path):
    write_env_file(empty_cwd / ".env", **{SETTINGS_BY_FIELD[field].env: raw})
    with pytest.raises(ConfigError) as info:
        load_for(field)({}, {})
    check_names_setting_and_value(info.value, field, raw, ".env file")


def test_valid_flag_hides_invalid_environment_value():
    assert load({"port": "9000"}, {"PORT": "junk"}).port == 9000


@pytest.mark.parametrize("missing", ["server_cert", "server_key", "server_ca_cert"])
def test_server_mtls_needs_all_three_files(missing: str):
    files = {"server_cert": "s.crt", "server_key": "s.key", "server_ca_cert": "ca.crt"}
    del files[missing]
    with pytest.raises(ConfigError) as info:
        load({"server_enable_mtls": "true", **files}, {})
    assert SETTINGS_BY_FIELD[missing].flag in str(info.value)
    assert SETTINGS_BY_FIELD[missing].env in str(info.value)


def test_config_errors_are_startup_errors():
    with pytest.raises(StartupError):
        load({"port": "x"}, {})
