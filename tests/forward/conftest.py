"""Fixtures of the forwarder's tests."""
import pytest

from support.forwarding import require_nats


@pytest.fixture(scope="session")
def needs_nats() -> None:
    """nats-server is installed: the test is skipped otherwise, or fails under
    SMQ_REQUIRE_NATS=1. Session-scoped, so it is checked before any module fixture
    starts a nats-server."""
    require_nats()
