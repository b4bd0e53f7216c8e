"""The ACL file in-process (smq/server/acl.py) and the RPC table (smq/server/access.py):
matching by right and pattern, the "*" and "@local" tables, every mistake reported as a
one-line ConfigError naming the file and the line, random text and random structures
never raising anything else, and a rule for every RPC of smq.proto."""
from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from smq.errors import ConfigError
from smq.server import access, acl, config as server_config
from smq.server.acl import ADMIN, CONSUME, PRODUCE, load_rules, parse_rules, rules_from

PATH = "/etc/smq/acl.toml"

EXAMPLE = """\
[identities."writer"]          # a client certificate's subject CN
produce = ["sensors.*"]        # fnmatch patterns of topic names
[identities."reader"]
consume = ["sensors.*", "logs.[ab]?"]
[identities."ops"]
admin = ["*"]
produce = ["*"]
consume = ["*"]
"""


# -- matching ---------------------------------------------------------------------------

def test_the_example_file_gives_each_identity_its_rights():
    rules = parse_rules(EXAMPLE, PATH)
    writer, reader, ops = (rules.for_certificate(n) for n in ("writer", "reader", "ops"))
    assert rules.identities == 3 and rules.path == PATH
    assert writer.allows(PRODUCE, "sensors.a") and not writer.allows(PRODUCE, "sensorsX")
    assert not writer.allows(CONSUME, "sensors.a") and not writer.allows(ADMIN, "sensors.a")
    assert reader.allows(CONSUME, "logs.a1") and not reader.allows(CONSUME, "logs.c1")
    assert not reader.allows(CONSUME, "Sensors.a")  # case-sensitive, as topic names are
    assert all(ops.allows(right, "anything") for right in acl.RIGHTS)
    assert rules.for_certificate("stranger") is None


def test_every_topic_at_once_needs_a_pattern_of_stars():
    rules = parse_rules('[identities.a]\nadmin = ["*"]\n[identities.b]\nadmin = ["?*", "x*"]\n',
                        PATH)
    assert rules.for_certificate("a").allows(ADMIN, None)
    assert not rules.for_certificate("b").allows(ADMIN, None)


def test_the_star_table_is_for_every_identity_without_its_own():
    rules = parse_rules('[identities."*"]\nconsume = ["public.*"]\n'
                        '[identities.writer]\nproduce = ["x"]\n', PATH)
    assert rules.for_certificate("stranger").allows(CONSUME, "public.a")
    assert rules.for_certificate("").allows(CONSUME, "public.a")  # a certificate without a CN
    assert not rules.for_certificate("writer").allows(CONSUME, "public.a")  # its own only


def test_local_callers_have_every_right_unless_the_file_has_a_local_table():
    assert parse_rules(EXAMPLE, PATH).for_local() is acl.FULL
    rules = parse_rules('[identities."@local"]\nproduce = ["x.*"]\n'
                        '[identities."*"]\nadmin = ["*"]\n', PATH)
    local = rules.for_local()
    assert local.allows(PRODUCE, "x.1") and not local.allows(ADMIN, "x.1")  # "*" is not for it


def test_a_certificate_named_like_the_local_table_does_not_get_it():
    rules = parse_rules('[identities."@local"]\nadmin = ["*"]\n', PATH)
    assert rules.for_certificate("@local") is None


def test_an_empty_file_has_no_identities():
    assert parse_rules("", PATH).identities == 0
    assert parse_rules("[identities]\n", PATH).identities == 0


# -- mistakes: one line naming the file and the line -------------------------------------

MISTAKES = {
    "TOML syntax": ('[identities.w]\nproduce = ["a"] x\n[identities.v]\n', 2),
    "TOML syntax at the end": ('[identities.writer]\nproduce = ["a",\n', 3),
    "unknown key": ('[identities.w]\nproduce = ["a"]\n\n[identites.x]\nadmin = ["*"]\n', 4),
    "unknown right": ('[identities."writer"]\nproduce = ["a"]\nprodcue = ["b"]\n', 3),
    "right in a dotted key": ('identities.w.produce = ["a"]\nidentities.w.admni = ["b"]\n', 2),
    "right in an inline table": ('[identities]\nw = { consume = ["a"] }\nv = { foo = [] }\n', 3),
    "pattern not a string": ('[identities.w]\nconsume = ["a"]\n[identities.v]\nadmin = [1]\n', 4),
    "patterns not a list": ('[identities.w]\n\nproduce = "sensors.*"\n', 3),
    "identity not a table": ('[identities]\nw = ["a"]\n', 2),
    "identities not a table": ('# rules\nidentities = 5\n', 2),
    "pattern that can never match": ('[identities.w]\nproduce = ["sensors/*"]\n', 2),
    "empty pattern": ('[identities.w]\nproduce = [""]\n', 2),
    "empty set": ('[identities.w]\n\nproduce = ["[]"]\n', 3),
    "empty range": ('[identities.w]\nproduce = ["a", "[z-a]"]\n', 2),
    "unclosed negated set": ('[identities.w]\nconsume = ["sensors.[!]"]\n', 2),
    "bang alone": ('[identities.w]\nadmin = ["!"]\n', 2),
    "set of no name character": ('[identities.w]\nadmin = ["a[!]"]\n', 2),
    "reserved identity": ('[identities.w]\nproduce = ["a"]\n[identities."@admin"]\n', 3),
    "duplicate key": ('[identities.w]\nproduce = ["a"]\nproduce = ["b"]\n', 3),
    "right as a sub-table": ('[identities."d"]\nconsume = ["s.*"]\n[identities."d".x]\n', 3),
    "right as a dotted key": ('[identities.d]\nconsume = ["s.*"]\nx.y = 1\n', 3),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_each_mistake_names_the_file_and_its_line(case: str):
    text, line = MISTAKES[case]
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, PATH)
    message = str(caught.value)
    assert "\n" not in message and PATH in message, message
    assert re.search(rf"\bline {line}\b", message), message


def test_file_errors_name_the_file(tmp_path: Path):
    for path, why in ((tmp_path / "missing.toml", "No such file"),
                      (tmp_path, "Is a directory")):
        with pytest.raises(ConfigError, match=why) as caught:
            load_rules(str(path))
        assert str(path) in str(caught.value)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[identities.w]\nproduce = ["caf\xe9"]\n')
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load_rules(str(latin))
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (acl.MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_rules(str(huge))


@pytest.mark.parametrize("text", ["x = " + "[" * 497 + "]" * 497,
                                  "x = " + "{a = " * 400 + "1" + "}" * 400])
def test_nesting_too_deep_for_the_toml_parser_is_a_one_line_error(text: str):
    with pytest.raises(ConfigError, match="nested too deeply") as caught:
        parse_rules(text + "\n", PATH)
    assert "\n" not in str(caught.value) and PATH in str(caught.value)


def test_a_reload_never_raises_and_keeps_the_old_rules(monkeypatch, caplog):
    gate = access.Gate(parse_rules(EXAMPLE, PATH))
    old = gate.rules

    def broken(path: str) -> acl.AccessRules:
        raise ValueError("something\nunexpected")

    monkeypatch.setattr(access, "load_rules", broken)
    gate.reload()
    assert gate.rules is old
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "something unexpected; keeping the access rules" in caplog.records[0].getMessage()


def test_an_empty_acl_file_setting_is_no_file_as_for_every_path_setting():
    # documented (docs/operations.md "Access control"): "" is unset, like --unix-socket ""
    config = server_config.load({"acl_file": "", "unix_socket": ""}, environ={})
    assert config.acl_file == "" and config.unix_socket == ""
    assert access.load_gate(config).rules is None


# -- random input: a ConfigError or rules, never anything else -----------------------------

# TOML-ish text: its punctuation, the file's words and a few troublemakers, joined.
TOMLISH = st.lists(st.sampled_from(list('[]{}="\'.,#*?! \n\tabc-_:0123456789') +
                                   ["identities", "produce", "consume", "admin", "@local",
                                    '"*"', "true", "\\u00e9", "\x00", "é", "\r\n"]),
                   max_size=80).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12), st.dates(), st.datetimes(), st.times())
KEYS = st.one_of(st.sampled_from(["identities", "produce", "consume", "admin", "*", "@local",
                                  "@x", "", "writer"]), st.text(max_size=8))
STRUCTURES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)
PATTERNS = st.text(alphabet=string.ascii_letters + "._-*?[]!", min_size=1, max_size=10).filter(
    lambda p: not acl._never_matches(p))  # the others are refused (MISTAKES)


@settings(max_examples=400, deadline=None)
@given(TOMLISH)
def test_random_text_gives_rules_or_a_one_line_config_error(text: str):
    try:
        parse_rules(text, PATH)
    except ConfigError as exc:
        assert "\n" not in str(exc) and PATH in str(exc)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, STRUCTURES, max_size=3), TOMLISH)
def test_random_structures_give_rules_or_a_one_line_config_error(document, text: str):
    try:
        rules_from(document, text, PATH)
    except ConfigError as exc:
        assert "\n" not in str(exc) and PATH in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda n: not n.startswith("@")),
                       st.dictionaries(st.sampled_from(acl.RIGHTS), st.lists(PATTERNS, max_size=3),
                                       max_size=3), max_size=3),
       st.text(alphabet=string.ascii_letters + "._-", min_size=1, max_size=10))
def test_valid_structures_match_as_fnmatchcase_does(document, topic: str):
    import fnmatch
    rules = rules_from({"identities": document}, "", PATH)
    for identity, table in document.items():
        grant = rules.for_certificate(identity)
        for right in acl.RIGHTS:
            expected = any(fnmatch.fnmatchcase(topic, p) for p in table.get(right, []))
            assert grant.allows(right, topic) == expected


# -- the RPC table ------------------------------------------------------------------------

def test_every_rpc_of_the_proto_has_a_rule_and_no_rule_is_left_over():
    assert set(access.RULES) == access.service_methods()


def test_every_rule_names_known_rights_and_a_real_topic_field():
    from smq._proto import smq_pb2
    service = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"]
    for method in service.methods:
        rule = access.RULES[method.name]
        assert set(rule.rights) <= set(acl.RIGHTS), method.name
        if rule.topic_field:
            assert rule.topic_field in method.input_type.fields_by_name, method.name
        assert rule.when_empty in ("", access.LISTED, access.EVERY), method.name


# -- the denial log: once per identity and topic, with a bound on the keys kept --------------

def test_denials_are_logged_once_per_key_and_invented_keys_share_one_line(caplog):
    import logging

    from smq.logs import ThrottledByKey
    lines = ThrottledByKey(logging.getLogger("test.denials"), seconds=60, max_keys=2)
    with caplog.at_level(logging.WARNING, logger="test.denials"):
        for key in ("a", "a", "b", "b", "a", "c", "d", "e"):
            lines.log(key, logging.WARNING, "denied %s", key)
    assert [r.getMessage() for r in caplog.records] == ["denied a", "denied b", "denied c"]


def test_keys_quiet_for_the_period_make_room():
    import logging

    from smq.logs import ThrottledByKey
    lines = ThrottledByKey(logging.getLogger("test.denials"), seconds=0, max_keys=2)
    for key in range(100):
        lines.log(key, logging.DEBUG, "denied")
    assert len(lines._lines) <= 2
