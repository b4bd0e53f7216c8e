"""/healthz follows the liveness check (the systemd watchdog's): a wedged writer turns it
to 503 with the reason, and it is 200 again once the writer commits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from smq.server import Server, ServerConfig
from support.poll import eventually
from support.scrape import get, scrape, value


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(dbpath=str(tmp_path / "q.db"), port=0, bind="127.0.0.1",
                          metrics_port=0, health_check_interval=0.2)
    with Server(config) as running:
        yield running


def test_healthz_is_503_while_the_writer_is_wedged(server):
    port = server.metrics_port
    eventually(lambda: get(port, "/healthz") == (200, "ok\n"), timeout=10)
    with server.service.writer._commit_lock:  # the writer cannot commit: as on a hung disk
        eventually(lambda: get(port, "/healthz")[0] == 503, timeout=10)
        status, reason = get(port, "/healthz")
        assert status == 503 and reason.count("\n") == 1 and "time" in reason, reason
        assert value(scrape(port), "smq_liveness_check_passing") == 0
    eventually(lambda: get(port, "/healthz") == (200, "ok\n"), timeout=10)
    assert value(scrape(port), "smq_liveness_check_passing") == 1


def test_healthz_is_503_once_the_server_drains(server):
    port = server.metrics_port
    server._stopped.set()  # what stop() sets first; the port stays until the end of the drain
    assert get(port, "/healthz") == (503, "shutting down\n")


def test_an_idle_listener_wakes_about_once_a_second(server):
    """The listener's thread sleeps in select while nothing comes: it woke every 10 ms
    (100 context switches a second on an idle board, metrics_costs.py measured it)."""
    eventually(lambda: get(server.metrics_port, "/healthz") == (200, "ok\n"), timeout=10)
    thread = server._metrics_port._thread
    status = Path(f"/proc/self/task/{thread.native_id}/status")

    def switches() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("voluntary_"))
        return int(line.split()[1])

    before = switches()
    time.sleep(3)
    assert switches() - before <= 6  # a wake-up a second, and some slack
