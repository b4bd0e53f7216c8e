"""The package's shape: one package per program over a small shared layer, imports that
only point down, modules small enough to read, each saying what it owns."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

PACKAGE = ROOT / "smq"
PROGRAMS = ("server", "client", "cli", "forward")
MAX_LINES = 500

# What each program's package may import from the others (beyond the shared layer).
MAY_IMPORT = {
    "server": set(),
    "client": set(),
    "forward": set(),
    "cli": {"server", "client", "forward"},
}
# Compatibility names at the top (`smq.Config`, `smq.Client`, `smq.config.Config`): they
# load the program's package only when asked for.
FACADES = {"smq/__init__.py", "smq/config.py", "smq/__main__.py"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts)


def name_of(path: Path) -> str:
    return str(path.relative_to(ROOT))


def imported_modules(path: Path) -> set[str]:
    """Every smq module `path` imports, anywhere in it, as a dotted name."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "smq" or name.startswith("smq.")}


def program_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PROGRAMS else None


@pytest.mark.parametrize("path", [p for p in modules() if name_of(p) not in FACADES], ids=name_of)
def test_imports_point_down(path):
    here = program_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
    allowed = MAY_IMPORT[here] if here else set()
    wrong = sorted(m for m in imported_modules(path)
                   if (p := program_of(m)) is not None and p != here and p not in allowed)
    assert not wrong, f"{name_of(path)} imports {wrong}"


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    return names


def test_the_service_knows_neither_grpc_nor_sqlite():
    """The queue's rules (smq/server/service.py) sit between the gRPC face and storage."""
    assert not top_level_imports(PACKAGE / "server" / "service.py") & {"grpc", "apsw"}


def test_the_access_rules_know_neither_grpc_nor_sqlite():
    """The ACL file's parsing and matching (smq/server/acl.py); access.py enforces them."""
    assert not top_level_imports(PACKAGE / "server" / "acl.py") & {"grpc", "apsw"}


def test_the_server_runs_without_the_client_or_nats():
    """What `smq serve` imports never reaches the client package or nats."""
    code = ("import sys, smq.cli.main, smq.server.app\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('smq.client', 'smq.forward', 'nats')))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_modules_are_small_and_say_what_they_own(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{name_of(path)} is over {MAX_LINES} lines"
    if text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{name_of(path)} has no module docstring"
