"""`smq forward`: forward SMQ topics to a NATS JetStream stream (main.py: the command;
config.py: its settings; engine.py: the forwarding; source.py: the SMQ side;
jetstream.py: the NATS side; metrics.py: its metrics and health check)."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
