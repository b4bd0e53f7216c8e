"""The README stays true: every setting is documented, and the commands it gives exist."""
import re

from conftest import ROOT
from smq.config import SETTINGS

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    rows = set(re.findall(r"^\| `(--[a-z-]+)` \| `([A-Z_]+)` \|", README, re.MULTILINE))
    assert rows == {(s.flag, s.env) for s in SETTINGS}


def test_the_two_setup_commands_are_the_ones_ci_runs():
    assert "./dev serve" in README and "./dev test" in README
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()
