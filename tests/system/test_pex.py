"""The single-file PEX (packaging/build-pex): its lock, its platforms, and the x86_64
PEX run as a user runs it. The PEX is built once per session (about 30 s with a warm
pex cache in build/pex-root, about a minute with an empty one), or taken from
$SMQ_TEST_PEX. The rebuild-and-compare check and the arm64/armv7l runs under qemu
live in packaging/ci-checks (they take minutes and need root).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import ROOT
from support.servers import clean_env, mdwe_supported
from smq import __version__
from smq.server.formats import SCHEMA_VERSION

PACKAGING = ROOT / "packaging"
PLATFORMS = PACKAGING / "platforms"
pytestmark = pytest.mark.timeout(600)


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_lock_pins_exactly_the_runtime_requirements():
    """requirements/runtime.txt and the PEX lock must move together (./dev pex --lock)."""
    lock = json.loads((ROOT / "requirements/runtime.lock.json").read_text())
    assert sorted(lock["requirements"]) == sorted(
        f"{name}=={version}" for name, version in pinned(ROOT / "requirements/runtime.txt").items())
    (resolve,) = lock["locked_resolves"]
    locked = {req["project_name"]: req for req in resolve["locked_requirements"]}
    for name, version in pinned(ROOT / "requirements/runtime.txt").items():
        assert locked[name]["version"] == version
    for req in locked.values():  # every artifact is hashed, and only sdnotify is built
        for artifact in req["artifacts"]:
            assert artifact["algorithm"] == "sha256" and len(artifact["hash"]) == 64
            is_wheel = artifact["url"].endswith(".whl")
            assert is_wheel or req["project_name"] == "sdnotify", artifact["url"]


def test_complete_platforms_cover_every_target():
    names = sorted(p.stem for p in PLATFORMS.glob("*.json"))
    assert names == [f"linux-{arch}-cp3{minor}" for arch in ("aarch64", "armv7l", "x86_64")
                     for minor in (11, 12, 13)]
    for path in PLATFORMS.glob("*.json"):
        data = json.loads(path.read_text())
        arch, cp = path.stem.split("-")[1:]
        markers = data["marker_environment"]
        assert markers["platform_machine"] == arch
        assert markers["python_version"] == f"3.{cp[3:]}"
        assert data["compatible_tags"][0].startswith(f"{cp}-{cp}-manylinux_2_")


def test_derived_platforms_are_what_the_checked_derivation_gives(tmp_path):
    """The 3.12 ARM files were derived; the derivation reproduces every real ARM file."""
    check = subprocess.run([sys.executable, str(PACKAGING / "complete_platforms.py"), "check",
                            str(PLATFORMS / "linux-x86_64-cp311.json"), str(PLATFORMS / "linux-aarch64-cp311.json"),
                            str(PLATFORMS / "linux-x86_64-cp313.json"), str(PLATFORMS / "linux-aarch64-cp313.json")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for arch in ("aarch64", "armv7l"):
        out = tmp_path / f"{arch}.json"
        subprocess.run([sys.executable, str(PACKAGING / "complete_platforms.py"), "derive",
                        str(PLATFORMS / "linux-x86_64-cp312.json"), str(PLATFORMS / "linux-x86_64-cp311.json"),
                        str(PLATFORMS / f"linux-{arch}-cp311.json"), str(out)], check=True, capture_output=True)
        assert json.loads(out.read_text()) == json.loads((PLATFORMS / f"linux-{arch}-cp312.json").read_text())


@pytest.fixture(scope="session")
def x86_pex(tmp_path_factory) -> Path:
    if os.environ.get("SMQ_TEST_PEX"):
        return Path(os.environ["SMQ_TEST_PEX"]).resolve()
    tools = subprocess.run([str(PACKAGING / "build-pex"), "--tools-only"], capture_output=True, text=True)
    if tools.returncode != 0:
        pytest.skip(f"pex could not be installed from requirements/build.txt: {tools.stderr[-500:]}")
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([str(PACKAGING / "build-pex"), "--arch", "x86_64", "--out", str(out)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr[-3000:]
    return out / f"smq-{__version__}-linux-x86_64.pex"


def test_pex_is_a_reproducible_sh_boot_venv_zipapp(x86_pex: Path):
    assert x86_pex.name == f"smq-{__version__}-linux-x86_64.pex"
    assert x86_pex.read_bytes()[:10] == b"#!/bin/sh\n"
    assert os.access(x86_pex, os.X_OK)
    with zipfile.ZipFile(x86_pex) as zf:
        info = json.loads(zf.read("PEX-INFO"))
        stamps = {entry.date_time for entry in zf.infolist()}
        names = [entry.filename for entry in zf.infolist()]
    assert stamps == {(1980, 1, 1, 0, 0, 0)}, "timestamps must not depend on the build time"
    assert not [n for n in names if n.endswith(".pyc")], "bytecode makes builds unreproducible"
    assert info["entry_point"] == "smq.cli:main" and info["venv"] is True
    dists = info["distributions"]
    assert not [d for d in dists if d.endswith(".whl") and "-none-any" not in d and "x86_64" not in d]
    for cp in ("cp311", "cp312", "cp313"):
        assert any(d.startswith("grpcio-") and f"-{cp}-" in d and "x86_64" in d for d in dists), cp
        assert any(d.startswith("apsw-") and f"-{cp}-" in d and "x86_64" in d for d in dists), cp
    assert f"smq_queue-{__version__}-py3-none-any.whl" in dists


def test_pex_serves_produce_consume_restart_and_subcommands(x86_pex: Path, tmp_path: Path):
    """packaging/smoke_pex.py: cold start, produce/consume, SIGTERM, warm restart on the
    same database, --version, serve --help, and a newer database refused."""
    report = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, str(PACKAGING / "smoke_pex.py"), str(x86_pex),
                             "--json", str(report)], capture_output=True, text=True,
                            env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["ok"] and [s["step"] for s in data["steps"]][:3] == [
        "cold start", "produce 20 messages", "consume 20 messages"]


def test_pex_refuses_a_database_from_a_newer_smq(x86_pex: Path, tmp_path: Path):
    db = tmp_path / "newer.db"
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    result = subprocess.run([str(x86_pex), "--dbpath", str(db), "--port", "0", "--bind", "127.0.0.1"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=clean_env(PEX_ROOT=str(tmp_path / "pex-root")))
    assert result.returncode == 2
    assert (f"has format {SCHEMA_VERSION + 1}, written by a newer SMQ; this SMQ reads formats "
            f"up to {SCHEMA_VERSION}") in result.stderr
    with sqlite3.connect(db) as conn:  # refused, not touched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0


@pytest.mark.skipif(not mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_pex_runs_without_writable_executable_memory(x86_pex: Path, tmp_path: Path):
    """The systemd unit sets MemoryDenyWriteExecute=yes: the /bin/sh boot, pex's first-run
    venv set-up and the server must all work without W+X memory."""
    result = subprocess.run([sys.executable, str(PACKAGING / "smoke_pex.py"), str(x86_pex), "--mdwe"],
                            capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
