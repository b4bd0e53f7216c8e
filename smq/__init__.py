"""SMQ: an ultra-light, durable, log-based message queue for small devices.

Run `smq --help` for the server and the command line; embed the server with
`smq.server.Server`; talk to one with `smq.Client`, or `smq.AsyncClient` from asyncio
(see `smq.client`). Every error is an `smq.SMQError` (see `smq.errors`).

The client names and `Config` are loaded on first use, so that `import smq` (and `smq --help`)
stays fast and does not load grpc (only `Client` does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    OffsetOutOfRange,
    PermissionDenied,
    ResourceExhausted,
    SMQAuthenticationError,
    SMQConnectionError,
    SMQConsumeError,
    SMQError,
    SMQException,
    SMQOffsetError,
    SMQProduceError,
    SMQTimeoutError,
    SMQTopicCreationError,
    TopicEmpty,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
)

if TYPE_CHECKING:
    from .client import (
        AsyncClient,
        AsyncProducer,
        Client,
        ClientTLSConfig,
        ConsumerInfo,
        Message,
        Producer,
        SentMessage,
        ServerInfo,
        TopicInfo,
        TopicPolicy,
    )
    from .server.config import ServerConfig as Config

__version__ = "0.1.0"

# name -> (module, attribute), loaded on first use: the client's names, and the server's
# settings as `Config`.
_LAZY = {
    "Config": (".server.config", "ServerConfig"),
    **{
        name: (".client", name)
        for name in (
            "Client",
            "Producer",
            "SentMessage",
            "AsyncClient",
            "AsyncProducer",
            "ClientTLSConfig",
            "Message",
            "TopicInfo",
            "TopicPolicy",
            "ConsumerInfo",
            "ServerInfo",
        )
    },
}

__all__ = [
    "__version__",
    "Config",
    # client (smq.client)
    "Client",
    "Producer",
    "SentMessage",
    "AsyncClient",
    "AsyncProducer",
    "ClientTLSConfig",
    "Message",
    "TopicInfo",
    "TopicPolicy",
    "ConsumerInfo",
    "ServerInfo",
    # errors (smq.errors): the root, pysmq's names, one class per status
    "SMQError",
    "SMQException",
    "SMQConnectionError",
    "SMQAuthenticationError",
    "SMQProduceError",
    "SMQConsumeError",
    "SMQTopicCreationError",
    "SMQOffsetError",
    "SMQTimeoutError",
    "Unavailable",
    "Unauthenticated",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "TopicEmpty",
    "OffsetOutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "InternalError",
    "Cancelled",
    "UnknownError",
    "AlreadyExists",
    "Aborted",
    "Unimplemented",
    "DataLoss",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
