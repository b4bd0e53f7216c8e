"""Helpers for the tests (importable as `support`: pyproject.toml's pytest `pythonpath`
and the Bazel targets' `imports` put tests/ on sys.path).

servers: server processes and in-process commands; disks: tmpfs and ext4 mounts;
poll: eventually(); certs: test certificates; forwarding: nats-server and the forwarder
as processes; pysmq_flows: a script test_pysmq runs in its own process.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout
