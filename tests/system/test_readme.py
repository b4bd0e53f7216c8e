"""The README stays a short, true page for users: the two set-up commands are the ones CI
runs, it stays under 300 lines, and every link in it resolves (every docs/ page is one
of them). Every setting is documented in docs/configuration.md, in its program's table."""
import re

from support import ROOT
from smq import connection
from smq.forward.config import SETTINGS as FORWARD_SETTINGS
from smq.server.config import SETTINGS

README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
MAX_LINES = 300


def section(text: str, title: str) -> str:
    """The text from a heading to the next heading of the same or higher level."""
    level = title.split(" ")[0]
    start = text.index(title + "\n")
    end = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(title):], re.MULTILINE)
    return text[start:start + len(title) + (end.start() if end else len(text))]


def rows(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"^\| `(--[a-z-]+)` \| `([A-Z_]+)` \|", text, re.MULTILINE))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_every_setting_is_in_the_configuration_page():
    assert rows(section(CONFIGURATION, "## Server")) == {(s.flag, s.env) for s in SETTINGS}
    assert rows(section(CONFIGURATION, "## Client commands")) == \
        {(s.flag, s.env) for s in connection.SETTINGS}
    assert rows(section(CONFIGURATION, "## Forwarder")) == \
        {(s.flag, s.env) for s in FORWARD_SETTINGS}


def test_the_two_setup_commands_are_the_ones_ci_runs():
    assert "./dev serve" in README and "./dev test" in README
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_stays_short():
    assert len(README.splitlines()) < MAX_LINES


def test_every_link_in_the_readme_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in anchors(target), f"README links to {link}: no such heading"


def test_the_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)
