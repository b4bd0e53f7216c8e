"""The linters' wiring (the linting itself is `./dev lint`, which CI runs): pinned tools
kept out of the hashed lock that Bazel and Nix read, a config that skips the generated
code, and CI running them."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from support import ROOT

REQUIREMENTS = ROOT / "requirements"


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_lint_tools_are_pinned_exactly():
    lines = requirement_lines(REQUIREMENTS / "lint.txt")
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.]*", line), line
    names = {line.split("==")[0].lower() for line in lines}
    assert {"ruff", "mypy"} <= names


def test_lint_tools_stay_out_of_the_dev_lock():
    """requirements/dev-hashes.txt is Bazel's lock and the Nix check's source: the lint
    tools must not need a new lock, so neither dev.txt nor runtime.txt pulls them in."""
    lock = (REQUIREMENTS / "dev-hashes.txt").read_text().lower()
    for source in ("dev.txt", "runtime.txt"):
        assert "lint.txt" not in (REQUIREMENTS / source).read_text()
    for line in requirement_lines(REQUIREMENTS / "lint.txt"):
        name = line.split("==")[0].lower()
        assert not re.search(rf"(?m)^{re.escape(name)}==", lock), name


def test_config_covers_smq_and_skips_the_generated_code():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ruff, mypy = config["tool"]["ruff"], config["tool"]["mypy"]
    assert ruff["line-length"] == 100
    assert "smq/_proto" in ruff["extend-exclude"]
    assert mypy["files"] == ["smq"]
    generated = [o for o in mypy["overrides"] if "smq._proto.*" in o["module"]]
    assert generated and generated[0]["ignore_errors"]


def test_ci_and_dev_run_the_linters():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"(?m)^\./dev lint\b", ci)
    assert re.search(r"(?m)^  lint\)", (ROOT / "dev").read_text())
