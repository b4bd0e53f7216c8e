"""docs/wire.md documents the whole of proto/smq.proto: every RPC with its kind, request,
response and origin, and every field of every message with its number and type, read
from the descriptor that smq._proto was generated with. Nothing it documents is missing
from the proto either, so the page fails this test as soon as it goes stale.

The other pages of docs/: the generated ones (docs/configuration.md, and systemd/*.env
beside them) are what scripts/gen_docs.py writes from the settings tables today, and
every relative link of every page names a file and a heading that exist."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from smq._proto import smq_pb2

WIRE_MD = Path(__file__).resolve().parents[2] / "docs" / "wire.md"
# The RPCs of the original SMQ, fixed for good; every other RPC is this SMQ's addition.
ORIGINAL_RPCS = {"Connect", "GetLatestOffset", "GetEarliestOffset", "CreateTopic", "Produce",
                 "Consume", "StreamProduce", "StreamConsume", "DeleteUntilOffset",
                 "BulkRetrieve"}
KINDS = {(False, False): "unary", (True, False): "client streaming",
         (False, True): "server streaming", (True, True): "bidirectional streaming"}

FieldDescriptorProto = descriptor_pb2.FieldDescriptorProto
PROTO = descriptor_pb2.FileDescriptorProto.FromString(smq_pb2.DESCRIPTOR.serialized_pb)
(SERVICE,) = PROTO.service


def type_of(field: FieldDescriptorProto) -> str:
    """The field's type as the .proto spells it: `repeated RetrievedMessage`, `optional bool`."""
    if field.type == FieldDescriptorProto.TYPE_MESSAGE:
        name = field.type_name.rsplit(".", 1)[-1]
    else:
        name = FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()
    if field.label == FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    return f"optional {name}" if field.proto3_optional else name


def short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def code(cell: str) -> str:
    """`Name` -> Name; anything else unchanged."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    return match.group(1) if match else cell


@pytest.fixture(scope="module")
def text() -> str:
    return WIRE_MD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def rpc_rows(text) -> dict[str, list[str]]:
    """The rows of the "RPCs at a glance" table, by RPC name."""
    rows = {}
    for line in text.splitlines():
        row = cells(line) if line.startswith("| `") else []
        if len(row) == 6:
            rows[code(row[0])] = [code(c) for c in row[1:]]
    return rows


@pytest.fixture(scope="module")
def documented_fields(text) -> dict[str, list[dict[str, tuple[int, str]]]]:
    """Every documentation of a message in the field tables (| message | field | number |
    type | meaning |; a blank message cell continues the row above), by message name:
    a list, as a message may be documented more than once."""
    found: dict[str, list[dict[str, tuple[int, str]]]] = {}
    in_table = False
    current: dict[str, tuple[int, str]] | None = None
    for line in text.splitlines():
        row = cells(line) if line.startswith("|") else None
        if row is None:
            in_table = False
            continue
        if row[:4] == ["message", "field", "number", "type"]:
            in_table = True
            continue
        if not in_table or set("".join(row)) <= set("-: "):
            continue
        assert len(row) == 5, f"a field table row needs 5 cells: {line!r}"
        message, field, number, kind = row[:4]
        if message:
            current = {}
            found.setdefault(code(message), []).append(current)
        assert current is not None, f"a field row before its message: {line!r}"
        if field == "(none)":
            continue
        name = code(field)
        assert name not in current, f"{name} documented twice in one table: {line!r}"
        current[name] = (int(number), code(kind))
    return found


@pytest.mark.parametrize("method", SERVICE.method, ids=lambda m: m.name)
def test_every_rpc_is_in_the_table_and_has_its_section(text, rpc_rows, method):
    origin = "original" if method.name in ORIGINAL_RPCS else "added"
    kind = KINDS[(method.client_streaming, method.server_streaming)]
    assert method.name in rpc_rows, f"{method.name} is missing from the RPC table"
    assert rpc_rows[method.name][:4] == [kind, short(method.input_type),
                                         short(method.output_type), origin]
    assert re.search(rf"^### {method.name}$", text, re.MULTILINE), \
        f"docs/wire.md has no section '### {method.name}'"


def test_the_rpc_table_names_no_rpc_the_proto_lacks(rpc_rows):
    assert set(rpc_rows) == {method.name for method in SERVICE.method}


@pytest.mark.parametrize("message", PROTO.message_type, ids=lambda m: m.name)
def test_every_field_of_every_message_is_documented(documented_fields, message):
    expected = {field.name: (field.number, type_of(field)) for field in message.field}
    assert message.name in documented_fields, f"no field table documents {message.name}"
    for documented in documented_fields[message.name]:
        assert documented == expected, message.name


def test_the_field_tables_name_no_message_the_proto_lacks(documented_fields):
    assert set(documented_fields) <= {message.name for message in PROTO.message_type}


def test_the_page_names_the_service_and_does_not_cite_files_outside_the_repository(text):
    assert f"`{PROTO.package}.{SERVICE.name}`" in text
    assert f"/{PROTO.package}.{SERVICE.name}/<RPC>" in text
    assert "WIRE.md" not in text


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_page_has_its_heading(text):
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, sorted(links - anchors)


# -- the other pages: generated ones are fresh, links between pages resolve ---------------

DOCS = WIRE_MD.parent
ROOT = DOCS.parent


def load_generator():
    """scripts/gen_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("relative", ["docs/configuration.md", "systemd/smq.env",
                                      "systemd/forward.env"])
def test_generated_file_is_fresh(relative):
    generated = {path.relative_to(ROOT).as_posix(): text
                 for path, text in load_generator().generated().items()}
    assert relative in generated
    assert (ROOT / relative).read_text(encoding="utf-8") == generated[relative], \
        f"{relative} is stale: run scripts/gen_docs.py"


def headings(path: Path) -> set[str]:
    """The anchors of a page's headings (code blocks left out)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_relative_link_of_a_page_resolves(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name} links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in headings(target), f"{page.name} links to {link}: no such heading"


def test_nothing_cites_the_team_wire_file_outside_the_repository():
    """The contract is docs/wire.md: no page, proto comment or docstring names WIRE.md."""
    files = [*DOCS.glob("*.md"), ROOT / "README.md", *(ROOT / "proto").glob("*.proto"),
             *(ROOT / "smq").rglob("*.py")]
    assert len(files) > 20
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w/])WIRE\.md", text), path.relative_to(ROOT)


def test_every_test_file_the_docs_name_exists():
    """Pages, README and docstrings name test files by path: they move with the tests."""
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "smq").rglob("*.py"),
             *(ROOT / "scripts").glob("*.py"), ROOT / ".ci" / "run"]
    missing = sorted({f"{path.relative_to(ROOT)}: {name}" for path in texts
                      for name in re.findall(r"\btests/[\w/]+\.py", path.read_text())
                      if not (ROOT / name).exists()})
    assert not missing, missing
