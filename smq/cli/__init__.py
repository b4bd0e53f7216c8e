"""The `smq` command line (console script `smq = smq.cli:main`; see main.py)."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
