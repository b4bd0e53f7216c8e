"""The README stays true: every setting is documented, and the commands it gives exist."""
import re

from support import ROOT
from smq import connection
from smq.server.config import SETTINGS

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README's text from a heading to the next heading of the same or higher level."""
    level = title.split(" ")[0]
    start = README.index(title + "\n")
    end = re.search(rf"^#{{1,{len(level)}}} ", README[start + len(title):], re.MULTILINE)
    return README[start:start + len(title) + (end.start() if end else len(README))]


def test_every_setting_is_in_the_configuration_table():
    table = section("### Configuration")
    rows = set(re.findall(r"^\| `(--[a-z-]+)` \| `([A-Z_]+)` \|", table, re.MULTILINE))
    assert rows == {(s.flag, s.env) for s in SETTINGS + connection.SETTINGS}


def test_the_two_setup_commands_are_the_ones_ci_runs():
    assert "./dev serve" in README and "./dev test" in README
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()
