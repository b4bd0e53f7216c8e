"""One error tree for SMQ. Each error carries the gRPC status name it travels as.

    SMQError
    ├── InvalidArgument        INVALID_ARGUMENT     bad topic name, bad argument
    ├── NotFound               NOT_FOUND
    │   ├── TopicNotFound                           the topic does not exist
    │   └── OffsetNotFound                          offset below 1 or already deleted
    ├── TopicEmpty             FAILED_PRECONDITION  no stored message (earliest/latest)
    ├── OffsetOutOfRange       OUT_OF_RANGE         offset above the latest
    ├── PermissionDenied       PERMISSION_DENIED    remote writes are disabled
    ├── ResourceExhausted      RESOURCE_EXHAUSTED
    │   ├── MessageTooLarge                         above the server's maximum
    │   ├── StorageFull                             disk full or quota reached
    │   └── Overloaded                              too many concurrent calls or streams
    ├── Unavailable            UNAVAILABLE          the server is shutting down
    ├── StorageFailure         INTERNAL             unexpected storage error (logged)
    └── StartupError                                the server cannot start (exit code 2)
        └── ConfigError                             a setting has an invalid value

The server maps `code` to a gRPC status in one place (server.py); storage maps
apsw errors into this tree in one place (storage.py).
"""
from __future__ import annotations


class SMQError(Exception):
    """Base of every SMQ error. `code` is the gRPC status name it is sent as."""
    code = "UNKNOWN"


class InvalidArgument(SMQError):
    code = "INVALID_ARGUMENT"


class NotFound(SMQError):
    code = "NOT_FOUND"


class TopicNotFound(NotFound):
    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


class OffsetNotFound(NotFound):
    pass


class TopicEmpty(SMQError):
    code = "FAILED_PRECONDITION"

    def __init__(self, topic: str) -> None:
        super().__init__("topic is empty")  # exact text fixed by WIRE.md
        self.topic = topic


class OffsetOutOfRange(SMQError):
    code = "OUT_OF_RANGE"


class PermissionDenied(SMQError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(SMQError):
    code = "RESOURCE_EXHAUSTED"


class MessageTooLarge(ResourceExhausted):
    pass


class StorageFull(ResourceExhausted):
    pass


class Overloaded(ResourceExhausted):
    pass


class Unavailable(SMQError):
    code = "UNAVAILABLE"


class StorageFailure(SMQError):
    code = "INTERNAL"


class StartupError(SMQError):
    """The server refuses to start; `main` prints the message and exits with code 2."""


class ConfigError(StartupError):
    """A setting has an invalid value. The message names the setting and the value."""

    def __init__(self, setting: str, value: str, reason: str) -> None:
        super().__init__(f"invalid {setting}: {value!r}: {reason}")
        self.setting = setting
        self.value = value
        self.reason = reason
