"""The access-control file (--acl-file): which topics each client certificate may
produce to, consume from and administer. Parsing and matching only; no grpc (the
server's calls are checked against it in smq/server/access.py).

    [identities."writer"]          # a client certificate's subject CN
    produce = ["sensors.*"]        # patterns of topic names (fnmatch, case-sensitive)
    [identities."ops"]
    admin = ["*"]
    [identities."*"]               # every identity without a table of its own
    consume = ["public.*"]
    [identities."@local"]          # callers on the Unix socket (full rights without it)
    produce = ["*"]

`load_rules` reads the file and returns AccessRules, or raises ConfigError with one line
that names the file and, for a mistake in it, its line. Rules are immutable: a reload
builds new ones and swaps the reference (access.Gate).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import string
import tomllib
from collections.abc import Mapping
from fnmatch import translate
from typing import Any, NoReturn

from ..errors import ConfigError

PRODUCE, CONSUME, ADMIN = "produce", "consume", "admin"
RIGHTS = (PRODUCE, CONSUME, ADMIN)
ANY_IDENTITY = "*"  # the table of every identity without its own
LOCAL = "@local"  # the table of callers on the Unix socket
SETTING = "--acl-file (SMQ_ACL_FILE)"
MAX_FILE_BYTES = 1024 * 1024  # far beyond any real file; --acl-file /dev/zero must not hang
# What a pattern may hold: a topic name's characters and fnmatch's. Anything else could
# never match a topic (the name rule, smq/domain.py), so it is a mistake to report.
PATTERN_RULE = re.compile(r"[A-Za-z0-9._\-*?\[\]!]+")


@dataclasses.dataclass(frozen=True)
class Grant:
    """One identity's table: the patterns of each right it has (a right left out has none)."""

    patterns: Mapping[str, tuple[str, ...]]
    _matchers: Mapping[str, re.Pattern[str]] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # One regex per right: a check is one match, however many patterns the right has.
        matchers = {
            right: re.compile("|".join(translate(p) for p in patterns))
            for right, patterns in self.patterns.items()
            if patterns
        }
        object.__setattr__(self, "_matchers", matchers)  # frozen: set once, here

    def has(self, right: str) -> bool:
        """Whether the right covers any topic at all."""
        return right in self._matchers

    def allows(self, right: str, topic: str | None) -> bool:
        """Whether `right` covers `topic`; None stands for every topic at once, which only
        a pattern of stars alone covers."""
        if topic is None:
            return any(p.strip("*") == "" for p in self.patterns.get(right, ()))
        matcher = self._matchers.get(right)
        return matcher is not None and matcher.match(topic) is not None


FULL = Grant(dict.fromkeys(RIGHTS, ("*",)))  # local callers, without an @local table


@dataclasses.dataclass(frozen=True)
class AccessRules:
    """The tables of an ACL file, by identity."""

    path: str
    grants: Mapping[str, Grant]

    def for_certificate(self, common_name: str) -> Grant | None:
        """The table of a client certificate's CN: its own, else the "*" table; None if
        neither exists. A CN spelled like a reserved name ("@local") never gets that
        table: a certificate must not pass for the Unix socket."""
        own = None if common_name.startswith("@") else self.grants.get(common_name)
        return own or self.grants.get(ANY_IDENTITY)

    def for_local(self) -> Grant:
        """The table of Unix-socket callers: @local's, else every right on every topic."""
        return self.grants.get(LOCAL, FULL)

    @property
    def identities(self) -> int:
        return len(self.grants)


def load_rules(path: str) -> AccessRules:
    """Read and check the ACL file at `path`; ConfigError (one line) if it cannot be read
    or holds a mistake."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (the server would hang at
        # start or on SIGHUP); then only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            kind = os.fstat(fd).st_mode
            if stat.S_ISDIR(kind):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            if not stat.S_ISREG(kind):
                raise ConfigError(SETTING, path, f"not a regular file ({_kind(kind)})")
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(SETTING, path, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(SETTING, path, f"larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(SETTING, path, f"line {line}: not UTF-8 text") from None
    return parse_rules(text, path)


def _kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def parse_rules(text: str, path: str) -> AccessRules:
    """The rules in `text` (the contents of the file at `path`, named in errors)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(SETTING, path, _syntax_error(str(exc), text)) from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(SETTING, path, "TOML syntax error: nested too deeply") from None
    return rules_from(document, text, path)


def rules_from(document: Mapping[str, Any], text: str, path: str) -> AccessRules:
    """Check the parsed document; `text` is where the line of a mistake is looked up."""
    for key in document:
        if key != "identities":
            _fail(
                path, _line_of_key(text, key), f'unknown key {quoted(key)} (expected "identities")'
            )
    tables = document.get("identities", {})
    if not isinstance(tables, dict):
        _fail(path, _line_of_key(text, "identities"), '"identities" must be a table')
    grants = {name: _grant(name, table, text, path) for name, table in tables.items()}
    return AccessRules(path, grants)


def _grant(identity: str, table: Any, text: str, path: str) -> Grant:
    where = f"[identities.{quoted(identity)}]"
    if not identity or (identity.startswith("@") and identity != LOCAL):
        _fail(
            path,
            _line_of_identity(text, identity),
            f"identity {quoted(identity)}: expected a certificate's CN, {quoted(ANY_IDENTITY)} or "
            f'{quoted(LOCAL)} (other names starting with "@" are reserved)',
        )
    if not isinstance(table, dict):
        _fail(path, _line_of_identity(text, identity), f"{where} must be a table")
    patterns = {}
    for right, value in table.items():
        line = _line_of_identity(text, identity, right)
        if right not in RIGHTS:
            _fail(
                path,
                line,
                f"unknown right {quoted(right)} in {where} (rights: {', '.join(RIGHTS)})",
            )
        patterns[right] = _patterns(value, f"{where} {right}", path, line)
    return Grant(patterns)


def _patterns(value: Any, where: str, path: str, line: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        _fail(path, line, f'{where} must be a list of topic patterns, such as ["sensors.*"]')
    for pattern in value:
        if not isinstance(pattern, str):
            _fail(path, line, f"{where}: {pattern!r} is not a string")
        if not PATTERN_RULE.fullmatch(pattern):
            _fail(
                path,
                line,
                f"{where}: pattern {quoted(pattern)} can never match a topic name "
                "(A-Z a-z 0-9 . _ - and the wildcards * ? [ ] !)",
            )
        problem = _never_matches(pattern)
        if problem:
            _fail(path, line, f"{where}: pattern {quoted(pattern)} can never match: {problem}")
    return tuple(value)


NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


def _never_matches(pattern: str) -> str:
    """Why fnmatch's reading of `pattern` matches no topic name ("" if some may): a "["
    that opens no set (fnmatch takes it as a "[" no name holds), a set with an empty range
    ("[z-a]") or no name character, or a "]" or "!" outside a set."""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "[":
            end = i + 1  # where fnmatch looks for the closing "]"
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1  # a "]" first is a member
            end = pattern.find("]", end)
            if end < 0:
                return f'the "[" at {i + 1} opens no set (no "]" closes it)'
            body = pattern[i + 1 : end]
            negated = body.startswith("!")
            members, problem = _members(body[1:] if negated else body)
            if problem:
                return problem
            if not negated and not members & NAME_CHARS:
                return f"the set {pattern[i : end + 1]} holds no character of a topic name"
            i = end + 1
        elif char in "]!":
            return f'a "{char}" outside a set is no character of a topic name'
        else:
            i += 1
    return ""


def _members(body: str) -> tuple[set[str], str]:
    """The characters of a set's body ("a-c" ranges expanded), or why it is malformed."""
    members: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            if low > high:
                return members, f"the range {low}-{high} is empty"
            members.update(chr(c) for c in range(ord(low), ord(high) + 1))
            i += 3
        else:
            members.add(body[i])
            i += 1
    return members, ""


def _fail(path: str, line: int, what: str) -> NoReturn:
    raise ConfigError(SETTING, path, f"line {line}: {what}")


def quoted(name: str) -> str:
    """A name as the file would quote it (control characters escaped: one line)."""
    return json.dumps(name, ensure_ascii=False)


def _syntax_error(message: str, text: str) -> str:
    """tomllib's "Invalid value (at line 3, column 9)" as "line 3, column 9: TOML syntax
    error: Invalid value": the line first, as in the other errors."""
    where = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if where is not None:
        line, column = where.groups()
        return f"line {line}, column {column}: TOML syntax error: {_one_line(message, where)}"
    end = re.search(r" \(at end of document\)$", message)
    if end is not None:
        last = text.count("\n") + 1
        return f"line {last} (the end): TOML syntax error: {_one_line(message, end)}"
    return f"TOML syntax error: {_one_line(message)}"


def _one_line(message: str, before: re.Match[str] | None = None) -> str:
    """The message (up to `before`) on one line."""
    return " ".join(message[: before.start() if before else None].split())


# -- the line of a key: TOML's parser gives lines for syntax errors only, so for a
# mistake in the rules the text is scanned for the key (best effort: line 1 if not found).


def _key_pattern(name: str) -> str:
    """A regex for `name` as a TOML key: bare, "quoted" or 'literal'."""
    forms = [re.escape(quoted(name)), re.escape(f"'{name}'")]
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        forms.append(re.escape(name))
    return "(?:" + "|".join(forms) + ")"


def _first_line(text: str, pattern: str, start: int = 0, stop: int | None = None) -> int | None:
    """The number (from 1) of the first line from index `start` that matches `pattern`."""
    lines = text.splitlines()
    for number in range(start, len(lines) if stop is None else min(stop, len(lines))):
        if re.search(pattern, lines[number]):
            return number + 1
    return None


def _line_of_key(text: str, key: str) -> int:
    """A top-level key's line: `key = ...`, `[key]` or `[key.sub]`."""
    name = _key_pattern(key)
    return _first_line(text, rf"^\s*(?:\[\[?\s*{name}\s*[\].]|{name}\s*[=.])") or 1


def _line_of_identity(text: str, identity: str, key: str | None = None) -> int:
    """The line of `key` in an identity's table, or of the table itself."""
    name = _key_pattern(identity)
    header = _first_line(text, rf"^\s*\[\s*identities\s*\.\s*{name}\s*\]")
    if header is not None:
        if key is None:
            return header
        next_header = _first_line(text, r"^\s*\[", header) or len(text.splitlines()) + 1
        found = _first_line(text, rf"^\s*{_key_pattern(key)}\s*[=.]", header, next_header - 1)
        # or a table of its own: [identities."dashboard".x], anywhere in the file
        sub = rf"^\s*\[\[?\s*identities\s*\.\s*{name}\s*\.\s*{_key_pattern(key)}\s*[\].]"
        return found or _first_line(text, sub) or header
    # identities.writer.produce = [...], writer = {...} under [identities], or inline
    mention = _first_line(text, rf"(?:^|[\s.{{,]){name}\s*[=.]") or _first_line(
        text, re.escape(identity) if identity else "identities"
    )
    if mention is not None and key is not None:
        return _first_line(text, rf"(?:^|[\s.{{,]){_key_pattern(key)}\s*=", mention - 1) or mention
    return mention or 1
