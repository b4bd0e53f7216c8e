"""The pysmq 1.0.8 client from PyPI works against this server unchanged.

Each flow runs in a subprocess with only pysmq imported (tests/support/pysmq_flows.py)
that prints what it observed as JSON.
pysmq's stream_produce is broken on the client side (1.0.8 calls a client-streaming
RPC as if it were bidirectional); StreamProduce is covered with the raw stub in
test_wire.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import ROOT
from support.servers import ServerProcess, clean_env

FLOWS = ROOT / "tests" / "support" / "pysmq_flows.py"

pytestmark = [
    pytest.mark.timeout(120),
    # pysmq is a test dependency (requirements/dev.txt); an environment without it (nixpkgs
    # has no pysmq) skips these, but CI must run them.
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import pysmq"], capture_output=True).returncode != 0
        and not os.environ.get("CI"), reason="pysmq 1.0.8 is not installed"),
]


def run_flow(server: ServerProcess, flow: str) -> dict:
    result = subprocess.run([sys.executable, str(FLOWS), str(server.port), flow],
                            capture_output=True, text=True, timeout=90, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def order(i: int) -> dict:
    items = ["apple", "pear", "plum", "fig", "kiwi"]
    return {"id": i, "item": items[i - 1], "qty": i * 2}


def test_pysmq_readme_flow(smq_server):
    out = run_flow(smq_server, "readme")
    assert out["offsets"] == [1, 2, 3, 4, 5]  # produce() reports real offsets
    assert out["consume_2"] == [order(2), 2]
    assert out["earliest_message"] == [order(1), 1]
    assert out["latest_message"] == [order(5), 5]
    assert (out["earliest"], out["latest"]) == (1, 5)
    assert out["streamed"] == [[order(i), i] for i in range(1, 6)] + [[{"id": 6, "item": "live"}, 6]]
    assert out["bulk_pages"] == [[[1, 2], 2, 3], [[3, 4], 2, 5], [[5, 6], 2, 7], [[], 0, 7]]
    assert out["bulk_from_0"] == [[order(i), i] for i in range(1, 6)] + [[{"id": 6, "item": "live"}, 6]]
    assert out["earliest_after_delete"] == 3
    assert out["consume_earliest_after_delete"] == 3
    assert out["consume_deleted"] == "NOT_FOUND"


def test_pysmq_errors_are_smq_exceptions_with_our_status_codes(smq_server):
    out = run_flow(smq_server, "errors")
    invalid_name = out.pop("create_invalid_name")
    assert out == {
        "consume_missing_topic": ["SMQConsumeError", "NOT_FOUND"],
        "consume_above_latest": ["SMQConsumeError", "OUT_OF_RANGE"],
        "consume_offset_0": ["SMQConsumeError", "NOT_FOUND"],
        "consume_earliest_empty": ["SMQConsumeError", "FAILED_PRECONDITION"],
        "consume_latest_empty": ["SMQConsumeError", "FAILED_PRECONDITION"],
        "latest_offset_empty": ["SMQException", "FAILED_PRECONDITION"],
        "produce_missing_topic": ["SMQProduceError", "NOT_FOUND"],
        "stream_missing_topic": ["SMQConsumeError", "NOT_FOUND"],
        "bulk_missing_topic": ["SMQConsumeError", "NOT_FOUND"],
    }
    # pysmq picks the class of an INVALID_ARGUMENT from words in the error text; any
    # SMQException subclass is fine for its callers, the status must be exact.
    assert invalid_name is not None and invalid_name[1] == "INVALID_ARGUMENT"


def test_pysmq_stream_consume_skips_heartbeats(smq_server):  # heartbeat interval 0.2 s
    assert run_flow(smq_server, "heartbeats")["streamed"] == [["finally", 1], ["again", 2]]
