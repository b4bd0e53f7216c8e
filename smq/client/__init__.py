"""The SMQ client: `pysmq` 1.0.8's API and more (see `smq.client.sync`), and the same
for asyncio: `AsyncClient` (see `smq.client.aio`) with its batching `AsyncProducer`.

    from smq.client import Client

    with Client("localhost", 8097) as client:
        client.create_topic("sensors")
        offset = client.produce("sensors", b'{"t": 21.5}')

Every public name is re-exported here and loaded on first use, so that importing the
package does not load grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import (
    SMQAuthenticationError,
    SMQConnectionError,
    SMQConsumeError,
    SMQException,
    SMQOffsetError,
    SMQProduceError,
    SMQTimeoutError,
    SMQTopicCreationError,
)

if TYPE_CHECKING:
    from ..domain import DEFAULT_PORT, TopicPolicy
    from .aio import AsyncClient
    from .aio_producer import AsyncProducer
    from .producer import Producer, SentMessage
    from .sync import Client
    from .transport import ERROR_FOR_STATUS
    from .types import (
        DEFAULT_TIMEOUT,
        SMQ_SPECIAL_OFFSET_HEARTBEAT,
        USE_CLIENT_DEFAULT,
        ClientConfig,
        ClientTLSConfig,
        ConsumerInfo,
        Message,
        ServerInfo,
        TopicInfo,
    )

# name -> the module that defines it (loaded on first use)
_LAZY = {
    "Client": "smq.client.sync",
    "Producer": "smq.client.producer",
    "SentMessage": "smq.client.producer",
    "AsyncClient": "smq.client.aio",
    "AsyncProducer": "smq.client.aio_producer",
    "ERROR_FOR_STATUS": "smq.client.transport",
    "DEFAULT_PORT": "smq.domain",
    "TopicPolicy": "smq.domain",
    **dict.fromkeys(
        (
            "ClientTLSConfig",
            "ClientConfig",
            "Message",
            "TopicInfo",
            "ConsumerInfo",
            "ServerInfo",
            "USE_CLIENT_DEFAULT",
            "SMQ_SPECIAL_OFFSET_HEARTBEAT",
            "DEFAULT_TIMEOUT",
        ),
        "smq.client.types",
    ),
}

__all__ = [
    "Client",
    "Producer",
    "SentMessage",
    "AsyncClient",
    "AsyncProducer",
    "ClientTLSConfig",
    "ClientConfig",
    "Message",
    "TopicInfo",
    "TopicPolicy",
    "ConsumerInfo",
    "ServerInfo",
    "USE_CLIENT_DEFAULT",
    "ERROR_FOR_STATUS",
    "SMQ_SPECIAL_OFFSET_HEARTBEAT",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "SMQException",
    "SMQConnectionError",
    "SMQAuthenticationError",
    "SMQProduceError",
    "SMQConsumeError",
    "SMQTopicCreationError",
    "SMQOffsetError",
    "SMQTimeoutError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
