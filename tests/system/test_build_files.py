"""The Nix and Bazel files agree with the project's pins (the fast part of what
packaging/check-nix-bazel checks with the real tools)."""
import base64
import re

from support import ROOT

LOCK = (ROOT / "requirements" / "dev-hashes.txt").read_text()
FLAKE = (ROOT / "flake.nix").read_text()
PIN = re.compile(r"(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;#]+)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries() -> dict[str, tuple[str, set[str]]]:
    entries = {}
    for block in re.split(r"(?m)^(?=[A-Za-z0-9])", LOCK):
        match = PIN.match(block)
        if match:
            entries[norm(match[1])] = (match[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return entries


def flake_pins() -> dict[str, dict[str, str]]:
    block = re.search(r"(?ms)^ {6}pins = \{\n(.*?)^ {6}\};", FLAKE)[1]
    pins = {}
    for name, body in re.findall(r"(?ms)^ {8}([a-z-]+) = \{\n(.*?)^ {8}\};", block):
        pins[name] = dict(re.findall(r'(\w+) = "([^"]*)";', body))
    return pins


def test_the_lock_has_every_pin_with_hashes():
    entries = lock_entries()
    assert all(hashes for _, hashes in entries.values())
    for source in ("runtime.txt", "dev.txt"):
        for name, version in PIN.findall((ROOT / "requirements" / source).read_text()):
            assert entries[norm(name)][0] == version, (source, name)


def test_flake_pins_are_the_locked_sdists_and_pyproject_floors():
    pins, entries = flake_pins(), lock_entries()
    assert set(pins) == {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
                         "grpcio-tools"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, pin in pins.items():
        version, hashes = entries[name]
        assert pin["version"] == version, name
        assert base64.b64decode(pin["hash"].removeprefix("sha256-")).hex() in hashes, name
        if name != "grpcio-tools":
            assert f'"{name}>={pin["floor"]}"' in pyproject, name


def test_bazel_and_nix_cover_every_runtime_dependency():
    build = (ROOT / "BUILD.bazel").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    runtime = re.search(r"(?s)^dependencies = \[(.*?)\]", pyproject, re.M)[1]
    for name in re.findall(r'"([A-Za-z0-9_.-]+)>=', runtime):
        assert f'requirement("{name}")' in build, name
        assert re.search(rf"(?m)^ +{re.escape(name)}$", FLAKE), name


def test_workspace_pins_rules_python_by_sha256():
    workspace = (ROOT / "WORKSPACE").read_text()
    assert re.search(r'name = "rules_python",\n    sha256 = "[0-9a-f]{64}"', workspace)
    assert 'requirements_lock = "//:requirements/dev-hashes.txt"' in workspace
