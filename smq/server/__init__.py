"""The SMQ server: a gRPC face over a group-commit writer and an SQLite log.

    from smq.server import Server, ServerConfig

    with Server(ServerConfig(dbpath="/data/q.db", port=0)) as server:  # port 0: any free port
        print("listening on", server.port)

`Server` and `create_server` load grpc and apsw; `ServerConfig` does not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ServerConfig

if TYPE_CHECKING:
    from .app import Server, create_server

__all__ = ["Server", "ServerConfig", "create_server"]


def __getattr__(name: str) -> Any:
    if name in ("Server", "create_server"):
        value = getattr(importlib.import_module(".app", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
