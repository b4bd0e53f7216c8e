"""SMQ: an ultra-light, durable, log-based message queue for small devices.

Run `smq --help` for the server; embed it with `smq.server.Server`.
"""
from .config import Config
from .errors import SMQError

__version__ = "0.1.0"
__all__ = ["Config", "SMQError", "__version__"]
