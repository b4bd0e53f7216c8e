"""One error tree for SMQ: the server raises it, the client raises it back.

    SMQError (alias SMQException)                .code .details .original_error
    ├── SMQConnectionError                       cannot reach the server, or lost it
    │   ├── Unavailable            UNAVAILABLE   server down, restarting or shutting down
    │   └── SMQAuthenticationError               TLS: certificates cannot be read or are refused
    │       ├── CertificateError                 a certificate file cannot be read or is invalid
    │       └── Unauthenticated    UNAUTHENTICATED
    ├── SMQTimeoutError
    │   └── DeadlineExceeded       DEADLINE_EXCEEDED  no answer within the timeout
    ├── InvalidArgument            INVALID_ARGUMENT   bad topic name, bad argument
    ├── NotFound                   NOT_FOUND
    │   ├── TopicNotFound                        the topic does not exist
    │   ├── OffsetNotFound                       offset below 1 or already deleted
    │   └── NoCommittedOffset                    a named consumer has no offset on the topic
    ├── TopicEmpty                 FAILED_PRECONDITION  no stored message (earliest/latest)
    ├── OffsetOutOfRange           OUT_OF_RANGE       offset above the latest
    ├── PermissionDenied           PERMISSION_DENIED  remote writes are disabled
    │   └── AccessDenied                         the server's ACL file denies this identity
    ├── ResourceExhausted          RESOURCE_EXHAUSTED
    │   ├── MessageTooLarge                      above the server's maximum
    │   ├── StorageFull                          disk full or quota reached
    │   ├── Overloaded                           too many calls or streams, or memory taken
    │   ├── TooManyConsumers                     a topic has --max-consumers-per-topic
    │   └── ListTooLarge                         a whole list asked for does not fit one answer
    ├── InternalError              INTERNAL           server-side failure (details in its log)
    │   └── StorageFailure                       unexpected storage error
    ├── Cancelled                  CANCELLED          the call was cancelled
    ├── UnknownError               UNKNOWN            the original SMQ's answer to most failures
    ├── AlreadyExists              ALREADY_EXISTS     (not sent by SMQ; mapped for completeness)
    ├── Aborted                    ABORTED            (not sent by SMQ)
    ├── Unimplemented              UNIMPLEMENTED      the server lacks the RPC (an older SMQ)
    ├── DataLoss                   DATA_LOSS          (not sent by SMQ)
    ├── SMQProduceError                          what the client was doing when it failed:
    ├── SMQConsumeError                          the exception classes of `pysmq` 1.0.8
    ├── SMQTopicCreationError
    ├── SMQOffsetError
    ├── JetStreamError                           smq forward: the NATS JetStream side failed
    │   ├── NotConnected                         no connection to any NATS server right now
    │   ├── StreamMissing                        the stream is missing or takes no such subject
    │   └── PublishFailed                        no acknowledgement, or a refusal (.err_code)
    └── StartupError                             a program cannot start (exit code 2)
        ├── ConfigError                          a setting has an invalid value
        └── MissingDependency                    smq forward: nats-py is not installed

Two axes, one tree. The status classes say *what went wrong*; each has the gRPC status
name it travels as in the class attribute `code` (a str: this module does not import
grpc), and a few a finer `reason`, sent beside the status (REASON_KEY). The server maps
`code` to a status in one place (smq.server.status), storage maps apsw errors into this
tree in one place (smq.server.storage), and `error_class` maps a status and reason
back (smq.client.transport, smq.forward.source).

`smq.client` maps every gRPC status back to one status class (one-to-one, see
`smq.client.ERROR_FOR_STATUS`). An error raised by a `Client` method is also an
instance of the `pysmq` class of the operation (`SMQProduceError` for `produce`,
`SMQConsumeError` for `consume`, ...), exactly where `pysmq` would raise that class, so
code written for pysmq keeps working::

    try:
        client.produce("nope", b"x")
    except smq.NotFound as exc:              # also an SMQProduceError
        print(exc.code, exc.details)         # grpc.StatusCode.NOT_FOUND, "topic 'nope' ..."

Connection, timeout and authentication errors are not tied to the operation (pysmq
raises them the same way for every call), except in `consume_earliest` and
`consume_latest`, where pysmq turns every error into an `SMQConsumeError`.

On an error raised by the client, `code` is the `grpc.StatusCode` received, `details`
the server's text (or gRPC's, which can be long: it stays out of the message) and
`original_error` the `grpc.RpcError`; the message is "could not `action`: `problem`".
When no connection could be made, the client probes the address (smq.client.probe) and
`cause` says why: "refused", "tls-expected", "client-cert-refused", ... A cause that
trying again cannot fix (a certificate problem, TLS on one side only) raises
SMQAuthenticationError, the others Unavailable.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc


class SMQError(Exception):
    """Base of every SMQ error.

    `code`: on the class, the gRPC status name it is sent as (str); on an error raised by
    `smq.client`, the `grpc.StatusCode` received. `details`: the status text the server
    sent ("" when the error did not come from a server). `original_error`: the exception
    it was translated from (a `grpc.RpcError` in the client), as in pysmq.
    """

    code: str | grpc.StatusCode = "UNKNOWN"
    details: str = ""
    # Set by the client: what it was doing ("produce to 't'"), what went wrong (the
    # message after "could not ACTION: "), and why no connection could be made, if so.
    action: str = ""
    problem: str = ""
    cause: str = ""
    # A finer cause than the status, where clients act on it: the server sends it in the
    # trailing metadata REASON_KEY, and the client raises the class that has it.
    reason: str = ""

    def __init__(self, message: str = "", original_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.original_error = original_error

    @classmethod
    def from_status(
        cls,
        message: str,
        *,
        code: Any,
        details: str,
        original_error: BaseException | None = None,
        **fields: Any,
    ) -> SMQError:
        """An instance of `cls` for a status received from a server (used by smq.client).
        Bypasses subclass constructors: `fields` (e.g. topic=...) become attributes."""
        exc = cls.__new__(cls)
        SMQError.__init__(exc, message, original_error)
        exc.code = code
        exc.details = details
        for name, value in fields.items():
            setattr(exc, name, value)
        return exc


SMQException = SMQError  # the name of pysmq's base class


# -- what the client was doing (pysmq's classes) -------------------------------------


class SMQConnectionError(SMQError):
    """The server cannot be reached, or the connection was lost (pysmq)."""


class SMQAuthenticationError(SMQConnectionError):
    """TLS or authentication failed, e.g. a certificate cannot be read (pysmq)."""


class CertificateError(SMQAuthenticationError):
    """A certificate, key or CA file cannot be read or is not valid PEM (smq.tls)."""


class SMQProduceError(SMQError):
    """Producing failed (pysmq): `produce`, `stream_produce`, `produce_many`."""


class SMQConsumeError(SMQError):
    """Consuming failed (pysmq): `consume*`, `stream_consume`, `bulk_retrieve`,
    `iter_messages`, `subscribe`."""


class SMQTopicCreationError(SMQError):
    """Creating a topic failed (pysmq)."""


class SMQOffsetError(SMQError):
    """Reading or trimming offsets failed (pysmq): `get_*_offset`, `delete_until_offset`."""


class SMQTimeoutError(SMQError):
    """An operation did not finish within its timeout (pysmq)."""


# -- what went wrong: one class per gRPC status ---------------------------------------


class Unavailable(SMQConnectionError):
    """The server is not reachable, restarting or shutting down. Reads are retried by
    the client; retry writes once it is back."""

    code = "UNAVAILABLE"


class Unauthenticated(SMQAuthenticationError):
    """The server refused the caller's credentials: check the client certificate and key."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(SMQTimeoutError):
    """No answer within the timeout. Pass a larger `timeout=`, or check the server."""

    code = "DEADLINE_EXCEEDED"


class InvalidArgument(SMQError):
    """A bad topic name (1 to 249 of A-Z a-z 0-9 . _ -) or another bad argument."""

    code = "INVALID_ARGUMENT"


class NotFound(SMQError):
    """The topic does not exist, or the offset is below 1 or already deleted."""

    code = "NOT_FOUND"


class TopicNotFound(NotFound):
    """The topic does not exist (create it first)."""

    reason = "topic-not-found"

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


class OffsetNotFound(NotFound):
    """The offset is below 1, or its message was deleted (trimmed)."""

    reason = "offset-not-found"


class NoCommittedOffset(NotFound):
    """The named consumer has committed no offset on the topic (yet)."""

    reason = "no-committed-offset"


class TopicEmpty(SMQError):
    """The topic stores no message, so it has no earliest or latest offset."""

    code = "FAILED_PRECONDITION"

    def __init__(self, topic: str) -> None:
        super().__init__("topic is empty")  # exact text fixed by docs/wire.md
        self.topic = topic


class OffsetOutOfRange(SMQError):
    """The offset is above the latest: that message does not exist yet."""

    code = "OUT_OF_RANGE"


class PermissionDenied(SMQError):
    """Remote writes are disabled (write through the server's Unix socket instead), or
    the server's access-control file denies the call (AccessDenied)."""

    code = "PERMISSION_DENIED"


class AccessDenied(PermissionDenied):
    """The server's access-control file (--acl-file) does not give the caller's identity
    (its client certificate's CN) this right on this topic; the message names all three."""

    reason = "access-denied"


class ResourceExhausted(SMQError):
    """Message too large, disk full or quota reached, or too many calls or streams."""

    code = "RESOURCE_EXHAUSTED"


class MessageTooLarge(ResourceExhausted):
    """The message is larger than the server's --max-message-size."""


class StorageFull(ResourceExhausted):
    """The disk is full or a configured storage quota is reached."""


class Overloaded(ResourceExhausted):
    """Too many concurrent calls or streams, or the server's memory budget is taken:
    retry later."""


class TooManyConsumers(ResourceExhausted):
    """The topic has as many named consumers as the server allows: delete one first."""


class ListTooLarge(ResourceExhausted):
    """The whole list was asked for (no page_size, no page_token) and does not fit one
    answer of the server: ask for pages."""


class InternalError(SMQError):
    """The server failed unexpectedly; its log has the details."""

    code = "INTERNAL"


class StorageFailure(InternalError):
    """The database failed unexpectedly (logged by the server)."""


class Cancelled(SMQError):
    """The call was cancelled before it finished."""

    code = "CANCELLED"


class UnknownError(SMQError):
    """Status UNKNOWN: what the original SMQ server answers for most failures."""

    code = "UNKNOWN"


class AlreadyExists(SMQError):
    """Status ALREADY_EXISTS (SMQ does not send it: creating a topic is idempotent)."""

    code = "ALREADY_EXISTS"


class Aborted(SMQError):
    """Status ABORTED (SMQ does not send it)."""

    code = "ABORTED"


class Unimplemented(SMQError):
    """The server does not know this call (e.g. an original SMQ server and a new RPC)."""

    code = "UNIMPLEMENTED"


class DataLoss(SMQError):
    """Status DATA_LOSS (SMQ does not send it)."""

    code = "DATA_LOSS"


# -- smq forward's upstream -----------------------------------------------------------


class JetStreamError(SMQError):
    """Something failed on the NATS JetStream side of `smq forward`; `str()` says what."""


class NotConnected(JetStreamError):
    """No connection to any NATS server right now (nats-py keeps reconnecting)."""


class StreamMissing(JetStreamError):
    """The stream does not exist, or does not take the subjects `smq forward` publishes."""


class PublishFailed(JetStreamError):
    """A message was refused, or not acknowledged. `err_code` is JetStream's, if any."""

    def __init__(self, message: str, err_code: int | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code


# -- the server side ------------------------------------------------------------------


class StartupError(SMQError):
    """The server refuses to start; `main` prints the message and exits with code 2."""


class ConfigError(StartupError):
    """A setting has an invalid value. The message names the setting and the value."""

    def __init__(self, setting: str, value: str, reason: str) -> None:
        super().__init__(f"invalid {setting}: {value!r}: {reason}")
        self.setting = setting
        self.value = value
        self.why = reason


class MissingDependency(StartupError):
    """An optional package a command needs is not installed (nats-py for smq forward)."""


# Raised for every operation the same way (pysmq does too): never combined with an
# operation class, except where pysmq wraps everything (consume_earliest/latest).
TRANSPORT_ERRORS = (SMQConnectionError, SMQTimeoutError)


@functools.cache
def with_operation(status_class: type[SMQError], operation_class: type[SMQError]) -> type[SMQError]:
    """The class of an error that is both `status_class` (what went wrong) and
    `operation_class` (what was being done), e.g. NotFound and SMQProduceError.

    Created once per pair and named like the status class, so `repr()` shows `NotFound(...)`.
    """
    if issubclass(status_class, operation_class):
        return status_class
    return type(
        status_class.__name__,
        (status_class, operation_class),
        {
            "__module__": status_class.__module__,
            "__qualname__": status_class.__qualname__,
            "__doc__": f"{status_class.__name__} raised while the client did what "
            f"{operation_class.__name__} stands for.",
        },
    )


# What the programs (smq, smq forward) exit with.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # success; failed at run time; bad usage or settings
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C stopped an operation (not a --follow)


# -- statuses and reasons, back to classes --------------------------------------------------

REASON_KEY = "smq-reason"  # trailing metadata of a failed call that has a reason

#: Every gRPC status (by name) an SMQ call can end with, and its error class (one-to-one).
CLASS_FOR_STATUS: dict[str, type[SMQError]] = {
    "CANCELLED": Cancelled,
    "UNKNOWN": UnknownError,
    "INVALID_ARGUMENT": InvalidArgument,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "FAILED_PRECONDITION": TopicEmpty,
    "ABORTED": Aborted,
    "OUT_OF_RANGE": OffsetOutOfRange,
    "UNIMPLEMENTED": Unimplemented,
    "INTERNAL": InternalError,
    "UNAVAILABLE": Unavailable,
    "DATA_LOSS": DataLoss,
    "UNAUTHENTICATED": Unauthenticated,
}
_CLASS_FOR_REASON = {
    cls.reason: cls for cls in (TopicNotFound, OffsetNotFound, NoCommittedOffset, AccessDenied)
}


def reason_in(trailing_metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The reason in a failed call's trailing metadata (pairs of key and value), or ""."""
    return next((str(value) for key, value in trailing_metadata or () if key == REASON_KEY), "")


def error_class(status: str, reason: str = "") -> type[SMQError]:
    """The class for a status name and the reason sent with it (an older server sends
    none: the status's class)."""
    finer = _CLASS_FOR_REASON.get(reason)
    if finer is not None and finer.code == status:
        return finer
    return CLASS_FOR_STATUS.get(status, UnknownError)
