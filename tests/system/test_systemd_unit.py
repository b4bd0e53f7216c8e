"""The unit file as systemd would load it, and the installer's staging tree."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT
from support.servers import SERVER_COMMAND
from smq.server.config import SETTINGS

UNIT = ROOT / "systemd" / "smq.service"
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (CI installs it)")


def real_exec_start() -> str:
    """A real built artifact to start: the server under test (SMQ_TEST_SERVER, e.g. the
    PEX, or Bazel's) or this environment's `smq` script."""
    if os.environ.get("SMQ_TEST_SERVER"):
        return " ".join(str(Path(p).resolve()) if i == 0 else p
                        for i, p in enumerate(SERVER_COMMAND))
    return str(Path(sys.executable).with_name("smq"))


def unit_with_real_exec_start(tmp_path: Path) -> Path:
    """The shipped unit, ExecStart pointed at a real built artifact."""
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={real_exec_start()}", UNIT.read_text())
    path = tmp_path / "smq.service"
    path.write_text(text)
    return path


@needs_systemd_analyze
def test_unit_verifies_cleanly(tmp_path):
    result = subprocess.run(["systemd-analyze", "verify", str(unit_with_real_exec_start(tmp_path))],
                            capture_output=True, text=True)
    # verify exits 0 on some errors: any output on stderr is a failure.
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         str(unit_with_real_exec_start(tmp_path))], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for smq.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_has_the_promised_settings():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "DynamicUser=yes",
                 "StateDirectory=smq", "CacheDirectory=smq", "EnvironmentFile=-/etc/smq/smq.env",
                 "ProtectSystem=strict", "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=\n",
                 "SystemCallFilter=@system-service", "UMask=0077",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in text, line
    assert re.search(r"(?m)^WatchdogSec=\d+", text)
    assert re.search(r"(?m)^Environment=.*PEX_ROOT=/var/cache/smq/", text)


def test_env_example_lists_every_server_setting():
    text = (ROOT / "systemd" / "smq.env").read_text()
    for setting in SETTINGS:
        if setting.field != "env_file":
            assert f"#{setting.env}=" in text, setting.env


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "packaging" / script), *args], capture_output=True, text=True)


def test_install_and_uninstall_into_a_staging_root(tmp_path):
    root = tmp_path / "root"
    pex = tmp_path / "smq-test.pex"
    pex.write_text("#!/bin/sh\necho smq\n")

    result = run("install", "--root", str(root), "--pex", str(pex))
    assert result.returncode == 0, result.stderr
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["etc/smq/forward.env", "etc/smq/forward.env.example",
                     "etc/smq/smq.env", "etc/smq/smq.env.example",
                     "etc/systemd/system/smq-forward.service",
                     "etc/systemd/system/smq.service", "opt/smq/smq.pex"]
    assert os.access(root / "opt/smq/smq.pex", os.X_OK)
    assert (root / "etc/systemd/system/smq.service").read_text() == UNIT.read_text()

    # An edited settings file survives a re-install (upgrade); the PEX is replaced.
    (root / "etc/smq/smq.env").write_text("PORT=9000\n")
    pex.write_text("#!/bin/sh\necho smq v2\n")
    assert run("install", "--root", str(root), "--pex", str(pex)).returncode == 0
    assert (root / "etc/smq/smq.env").read_text() == "PORT=9000\n"
    assert "v2" in (root / "opt/smq/smq.pex").read_text()

    # Uninstall keeps settings and data; --purge removes them.
    (root / "var/lib/smq").mkdir(parents=True)
    (root / "var/lib/smq/smq.db").write_text("data")
    assert run("uninstall", "--root", str(root)).returncode == 0
    assert not (root / "opt/smq/smq.pex").exists()
    assert not (root / "etc/systemd/system/smq.service").exists()
    assert not (root / "etc/systemd/system/smq-forward.service").exists()
    assert (root / "etc/smq/smq.env").exists() and (root / "var/lib/smq/smq.db").exists()
    assert run("uninstall", "--root", str(root), "--purge").returncode == 0
    assert not (root / "etc/smq").exists() and not (root / "var/lib/smq").exists()


def test_install_refuses_a_missing_pex(tmp_path):
    result = run("install", "--root", str(tmp_path), "--pex", str(tmp_path / "nope.pex"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_install_creates_the_settings_files_for_root_only(tmp_path):
    """They may hold secrets (NATS_PASSWORD): 0600, and root's when installed by root;
    the examples beside them hold none and stay readable."""
    root = tmp_path / "root"
    pex = tmp_path / "smq-test.pex"
    pex.write_text("#!/bin/sh\necho smq\n")
    result = run("install", "--root", str(root), "--pex", str(pex))
    assert result.returncode == 0, result.stderr
    for name in ("smq.env", "forward.env"):
        info = (root / "etc/smq" / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, name
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), name
        assert f"created /etc/smq/{name}, mode 0600" in result.stdout
        assert stat.S_IMODE((root / "etc/smq" / f"{name}.example").stat().st_mode) == 0o644
    if os.getuid() == 0:
        assert "mode 0600 root:root" in result.stdout


def test_install_never_changes_the_mode_of_existing_settings_files(tmp_path):
    root = tmp_path / "root"
    pex = tmp_path / "smq-test.pex"
    pex.write_text("#!/bin/sh\necho smq\n")
    (root / "etc/smq").mkdir(parents=True)
    (root / "etc/smq/smq.env").write_text("PORT=9000\n")
    (root / "etc/smq/smq.env").chmod(0o640)
    (root / "etc/smq/forward.env").write_text("NATS_PASSWORD=s3cret\n")
    (root / "etc/smq/forward.env").chmod(0o644)  # as an older install left it

    result = run("install", "--root", str(root), "--pex", str(pex))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((root / "etc/smq/smq.env").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/smq/forward.env").stat().st_mode) == 0o644
    assert (root / "etc/smq/forward.env").read_text() == "NATS_PASSWORD=s3cret\n"
    lines = result.stdout.splitlines()
    assert "install: keeping existing /etc/smq/smq.env and its mode 0640" in result.stdout
    assert "install: keeping existing /etc/smq/forward.env and its mode 0644" in result.stdout
    readable = [line for line in lines if "can be read by every user" in line]
    assert readable == ["install: /etc/smq/forward.env can be read by every user of this device; "
                        "if it holds secrets: chmod 600 /etc/smq/forward.env"]


# -- secrets through systemd's credentials (LoadCredential=) -------------------------------

UNITS = {"smq.service": ("server.key", "SERVER_KEY_FILE"),
         "smq-forward.service": ("nats-password", "NATS_PASSWORD_FILE")}


def with_credentials(text: str) -> str:
    """The unit with its commented credential lines in effect."""
    return re.sub(r"(?m)^#((LoadCredential|Environment)=)", r"\1", text)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_show_how_to_pass_secrets_as_credentials(name: str):
    credential, variable = UNITS[name]
    text = (ROOT / "systemd" / name).read_text()
    assert re.search(rf"(?m)^#LoadCredential={credential}:/etc/smq/\S+$", text)
    assert re.search(rf"(?m)^#Environment=.*{variable}=%d/{credential}\b", text)
    assert "systemctl edit" in text and "overrides Environment=" in text
    env = (ROOT / "systemd" / ("smq.env" if name == "smq.service" else "forward.env")).read_text()
    assert f"LoadCredential={credential}:" in env and f"{variable}=%d/{credential}" in env


@needs_systemd_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_with_the_credential_lines_verify_cleanly(name: str, tmp_path: Path):
    text = with_credentials((ROOT / "systemd" / name).read_text())
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={real_exec_start()}", text)
    unit = tmp_path / name
    unit.write_text(text)
    assert text.count("\nLoadCredential=") >= 1
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
