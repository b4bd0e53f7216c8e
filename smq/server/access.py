"""Who may call what: the right and the topic of every RPC (RULES), the caller's identity,
and the check every SMQ call passes before its handler runs (Gate.admit, called by the
handler wrappers in status.py). The rules themselves come from the ACL file (acl.py).

Without --acl-file nothing is checked here. With it, a TCP caller is the subject CN of
its client certificate (mTLS is required), a Unix-socket caller is "@local" (every
right unless the file has an "@local" table). Denied calls raise AccessDenied (status
PERMISSION_DENIED), naming the identity, the right and the topic, and are logged once a
minute per identity and topic. SIGHUP replaces the rules (Gate.reload): one reference,
swapped whole; every check reads the current one, so a stream checked per message or
page loses a right taken away while it is open.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import grpc

from .._proto import smq_pb2
from ..domain import check_name
from ..errors import AccessDenied, ConfigError
from ..logs import ThrottledByKey
from .acl import (
    ADMIN,
    CONSUME,
    LOCAL,
    PRODUCE,
    SETTING,
    AccessRules,
    Grant,
    load_rules,
    quoted,
)
from .config import ServerConfig

log = logging.getLogger(__name__)

MAX_SHOWN = 256  # characters of an identity in a denial, its log line and its key
LISTED = "listed"  # an empty topic filter: the entries are filtered by right instead
EVERY = "every"  # an empty topic means every topic (DeleteConsumer)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a call needs. `rights`: any one of them will do; none: an accepted client
    certificate is enough. `topic_field`: the request's field that names the topic
    ("": the call names none, or names one per message with `each_message`).
    `when_empty`: what an empty topic field means (LISTED, EVERY; "": a name like any)."""

    rights: tuple[str, ...] = ()
    topic_field: str = ""
    when_empty: str = ""
    each_message: bool = False


ANYONE = Rule()  # needs only the TLS handshake


def on_topic(*rights: str, when_empty: str = "") -> Rule:
    return Rule(rights, "topic", when_empty)


# Every RPC of smq.proto (a test fails if one is missing). Admin may read what describes
# a topic (offsets, policy, consumers), as ListTopics shows it; reading messages and
# committing a consumer's place need consume.
RULES: Mapping[str, Rule] = {
    "Connect": ANYONE,
    "GetServerInfo": ANYONE,
    "Produce": on_topic(PRODUCE),
    "ProduceBatch": on_topic(PRODUCE),
    "StreamProduce": Rule((PRODUCE,), each_message=True),
    "Consume": on_topic(CONSUME),
    "StreamConsume": on_topic(CONSUME),
    "BulkRetrieve": on_topic(CONSUME),
    "Subscribe": on_topic(CONSUME),
    "CommitOffset": on_topic(CONSUME),
    "GetEarliestOffset": on_topic(CONSUME, ADMIN),
    "GetLatestOffset": on_topic(CONSUME, ADMIN),
    "DescribeTopic": on_topic(CONSUME, ADMIN),
    "GetTopicPolicy": on_topic(CONSUME, ADMIN),
    "GetCommittedOffset": on_topic(CONSUME, ADMIN),
    "ListTopics": Rule((CONSUME, ADMIN)),  # lists the topics either right covers
    "ListConsumers": on_topic(CONSUME, ADMIN, when_empty=LISTED),
    "CreateTopic": on_topic(ADMIN),
    "DeleteTopic": on_topic(ADMIN),
    "DeleteUntilOffset": on_topic(ADMIN),
    "SetTopicPolicy": on_topic(ADMIN),
    "DeleteConsumer": on_topic(ADMIN, when_empty=EVERY),
}

VERBS = {PRODUCE: "produce to", CONSUME: "consume from", ADMIN: "administer"}


def is_local(context: grpc.ServicerContext) -> bool:
    """True for callers on the Unix socket."""
    return context.peer().startswith("unix:")


def common_name(context: grpc.ServicerContext) -> tuple[str, str]:
    """The subject CN of the caller's client certificate ("" if it has none), and why
    the certificate is refused ("" if it is not): see certificate_identity."""
    return certificate_identity(context.auth_context())


def certificate_identity(auth: Mapping[str, Any]) -> tuple[str, str]:
    """(CN, refusal) from a gRPC auth context. gRPC's "x509_common_name" stops at a NUL
    ("operator\\0evil" would read "operator") and is one of several CNs, so it is checked
    against "x509_subject" (RFC 2253, every attribute): a subject with more than one CN,
    or whose CN holds a NUL or differs from it, is refused whatever the rules say."""
    name = _first(auth, "x509_common_name")
    subject = _first(auth, "x509_subject")
    names = [value for kind, value in _rfc2253(subject) if kind.upper() in ("CN", "2.5.4.3")]
    if len(names) > 1:
        return "", f"with {len(names)} subject CNs (an identity is one CN)"
    if names and b"\0" in names[0]:
        return "", "whose subject CN holds a NUL byte"
    if (names[0] if names else b"") != name:
        return "", "whose subject CN could not be read unambiguously"
    return name.decode("utf-8", "replace"), ""


def _first(auth: Mapping[str, Any], key: str) -> bytes:
    values = auth.get(key) or [b""]
    value = values[0]
    return value if isinstance(value, bytes) else str(value).encode()


def _rfc2253(subject: bytes) -> list[tuple[str, bytes]]:
    """The (type, value) attributes of an RFC 2253 subject, values unescaped ("\\2C" and
    "\\," are ","), as OpenSSL writes it for gRPC."""
    attributes: list[tuple[str, bytes]] = []
    kind, value, in_value, i = b"", bytearray(), False, 0
    while i < len(subject):
        char = subject[i : i + 1]
        if char == b"\\" and i + 1 < len(subject):
            pair = subject[i + 1 : i + 3]
            if len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair):
                value += bytes.fromhex(pair.decode())
                i += 3
                continue
            value += subject[i + 1 : i + 2]
            i += 2
            continue
        if char in (b",", b"+"):
            attributes.append((kind.decode("ascii", "replace").strip(), bytes(value)))
            kind, value, in_value = b"", bytearray(), False
        elif char == b"=" and not in_value:
            kind, in_value = bytes(value), True
            value = bytearray()
        else:
            value += char
        i += 1
    if in_value or value:
        attributes.append((kind.decode("ascii", "replace").strip(), bytes(value)))
    return attributes


class Gate:
    """The current rules (None: no ACL file, everything allowed) and the checks."""

    def __init__(self, rules: AccessRules | None) -> None:
        self.rules = rules  # replaced whole by reload(): readers take one reference
        self._denials = ThrottledByKey(log)

    def reload(self) -> None:
        """Read the file again: new rules replace the old at once, or, if the file is
        now invalid, the old ones stay; one line in the log either way."""
        if self.rules is None:
            log.info("SIGHUP: no --acl-file (SMQ_ACL_FILE) to reload")
            return
        try:
            rules = load_rules(self.rules.path)
        except ConfigError as exc:
            log.error("%s; keeping the access rules loaded before", exc)
            return
        except Exception as exc:  # a reload must never stop the server
            log.error(
                "invalid %s: %r: %s: %s; keeping the access rules loaded before",
                SETTING,
                self.rules.path,
                type(exc).__name__,
                " ".join(str(exc).split()),
            )
            return
        self.rules = rules
        log.info("access rules reloaded from %s: %s", rules.path, _identities(rules))

    def caller(self, context: grpc.ServicerContext) -> Caller:
        if is_local(context):
            return Caller(self, LOCAL, local=True, peer=context.peer())
        identity, refused = common_name(context)
        return Caller(self, identity, local=False, peer=context.peer(), refused=refused)

    def admit(self, rpc: str, request: Any, context: grpc.ServicerContext) -> None:
        """Raise AccessDenied unless the caller may make this call on its topic."""
        if self.rules is None:
            return
        rule = RULES.get(rpc)
        if rule is not None and not rule.rights:
            return  # Connect, GetServerInfo: the TLS handshake was the check
        caller = self.caller(context)
        if rule is None:  # fail closed: a call nobody wrote a rule for
            caller.deny(f"call {rpc} (no access rule for it)", rpc)
        if rule.each_message:  # StreamProduce: each message is checked as it is read
            if not any(caller.has(right) for right in rule.rights):
                caller.deny(_verb(rule.rights) + " any topic", "any topic")
            return
        if not rule.topic_field:  # ListTopics: filtered by right, for known identities
            if caller.grant is None:
                caller.deny(f"call {rpc}", rpc)
            return
        topic = getattr(request, rule.topic_field)
        if topic or not rule.when_empty:
            caller.check(rule.rights, topic)
        elif rule.when_empty == EVERY:
            caller.check(rule.rights, None)
        elif caller.grant is None:  # LISTED: filtered like ListTopics
            caller.deny(f"call {rpc}", rpc)

    def stream_check(self, rpc: str, context: grpc.ServicerContext) -> Callable[[str], None]:
        """For a stream: raises AccessDenied unless the caller still has the rpc's right
        on a topic; called per message (StreamProduce) or page (StreamConsume, Subscribe)."""
        if self.rules is None:
            return _allowed
        return stream_checks(self.caller(context), RULES[rpc].rights)

    def topic_filter(self, rpc: str, context: grpc.ServicerContext) -> Callable[[str], bool] | None:
        """For a listing: whether the caller may see an entry of a topic (None: every one)."""
        if self.rules is None:
            return None
        caller, rights = self.caller(context), RULES[rpc].rights
        return lambda topic: caller.may(rights, topic)

    def log_denial(self, identity: str, topic: str, message: str) -> None:
        self._denials.log((identity, topic), logging.WARNING, "denied: %s", message)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling, checked against the gate's current rules at each check."""

    gate: Gate
    identity: str  # the certificate's CN, or "@local"
    local: bool
    peer: str = ""  # for the log
    refused: str = ""  # why the certificate is refused whatever the rules ("": it is not)

    @property
    def grant(self) -> Grant | None:
        rules = self.gate.rules
        if rules is None or self.refused:
            return None
        return rules.for_local() if self.local else rules.for_certificate(self.identity)

    def has(self, right: str) -> bool:
        grant = self.grant
        return grant is not None and grant.has(right)

    def may(self, rights: tuple[str, ...], topic: str | None) -> bool:
        """Whether any of `rights` covers `topic` (None: every topic)."""
        if self.gate.rules is None:
            return True
        grant = self.grant
        return grant is not None and any(grant.allows(right, topic) for right in rights)

    def check(self, rights: tuple[str, ...], topic: str | None) -> None:
        if not self.may(rights, topic):
            if topic is not None:
                # A name no topic can have (up to the request's size): INVALID_ARGUMENT, as
                # the handler would answer, with the name cut short; never echoed whole
                # in a denial, the log or the denials' keys.
                check_name(topic)
            shown = "every topic" if topic is None else f"topic {quoted(topic)}"
            self.deny(f"{_verb(rights)} {shown}", topic or "every topic")

    def deny(self, what: str, topic: str) -> NoReturn:
        """Raise AccessDenied: "identity "reader" may not produce to topic "t" (...)"."""
        rules = self.gate.rules
        path = rules.path if rules is not None else ""
        known = self.grant is not None
        why = f"acl file {path}" if known else f"no rules for it in acl file {path}"
        if self.refused:
            why = f"a certificate {self.refused} is refused; acl file {path}"
        message = f"{self._who()} may not {what} ({why})"
        self.gate.log_denial(
            self.identity[:MAX_SHOWN], topic[:MAX_SHOWN], f"{message}; peer {self.peer}"
        )
        raise AccessDenied(message)

    def _who(self) -> str:
        if self.refused:
            return f"a client certificate {self.refused}"
        if not self.identity and not self.local:
            return "a client certificate without a subject CN"
        shown = self.identity
        if len(shown) > MAX_SHOWN:  # a CN is up to the certificate's size
            shown = shown[: MAX_SHOWN - 3] + "..."
        return f"identity {quoted(shown)}"


def stream_checks(caller: Caller, rights: tuple[str, ...]) -> Callable[[str], None]:
    """A check of `rights` on a stream's topics: checked again only when the topic or
    the rules changed (most streams write one topic, and a full check per message would
    cost StreamProduce's fast path)."""
    checked: tuple[AccessRules | None, str] | None = None

    def check(topic: str) -> None:
        nonlocal checked
        rules = caller.gate.rules
        if checked is None or checked[0] is not rules or checked[1] != topic:
            caller.check(rights, topic)
            checked = (rules, topic)

    return check


def _allowed(topic: str) -> None:
    pass


def load_gate(config: ServerConfig) -> Gate:
    """The gate for the server's settings; ConfigError (one line) for an ACL file that
    cannot be used: unreadable, a mistake in it, or no client certificates to match."""
    if not config.acl_file:
        return Gate(None)
    if not config.server_enable_mtls:
        raise ConfigError(
            SETTING,
            config.acl_file,
            "needs --server-enable-mtls (SERVER_ENABLE_MTLS): identities are the subject "
            "CNs of client certificates",
        )
    rules = load_rules(config.acl_file)
    log.info("access rules loaded from %s: %s", rules.path, _identities(rules))
    return Gate(rules)


def _identities(rules: AccessRules) -> str:
    return f"{rules.identities} identit{'y' if rules.identities == 1 else 'ies'}"


def _verb(rights: tuple[str, ...]) -> str:
    return " or ".join(VERBS[right] for right in rights)


def service_methods() -> set[str]:
    """The RPCs of smq.proto's service (RULES must name each one)."""
    service = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"]
    return {method.name for method in service.methods}
