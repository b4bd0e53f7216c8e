"""Names kept for programs written against earlier SMQs and pysmq.

- `Config` is the server's config (smq.server.config.ServerConfig).
- pysmq kept its client settings in `pysmq.config`; so does SMQ, lazily (they live in
  smq.client, which loads grpc): `from smq.config import ClientTLSConfig` works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .server.config import ServerConfig as Config

if TYPE_CHECKING:
    from .client import SMQ_SPECIAL_OFFSET_HEARTBEAT, ClientConfig, ClientTLSConfig

__all__ = ["Config", "ClientTLSConfig", "ClientConfig", "SMQ_SPECIAL_OFFSET_HEARTBEAT"]


def __getattr__(name: str) -> Any:
    if name in ("ClientTLSConfig", "ClientConfig", "SMQ_SPECIAL_OFFSET_HEARTBEAT"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
