"""The benchmark script works (bench/bench.py --quick). No performance assertion here:
the figures are measured on a shared, noisy machine and only ever reported."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from support import ROOT

from smq.server import app, servicer, service
from smq.server.config import ServerConfig


def load_raw_server():
    spec = importlib.util.spec_from_file_location("raw_server", ROOT / "bench" / "raw_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_server_has_the_same_shape_as_smq():
    raw = load_raw_server()
    assert (raw.ENVELOPE_BYTES, raw.MAX_BATCH_BYTES, raw.QUEUED_CALLS_PER_WORKER) == (
        app.ENVELOPE_BYTES, servicer.MAX_BATCH_BYTES, app.QUEUED_CALLS_PER_WORKER)
    assert (raw.PAGE_BYTES, raw.DEFAULT_PAGE_MESSAGES, raw.MAX_PAGE_MESSAGES) == (
        service.PAGE_BYTES, service.DEFAULT_PAGE_MESSAGES, service.MAX_PAGE_MESSAGES)
    defaults = ServerConfig()
    assert (raw.WORKERS, raw.MAX_STREAMS, raw.MAX_MESSAGE_SIZE) == (
        defaults.workers, defaults.max_streams, defaults.max_message_size)


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--sizes", "100",
         "--modes", "full", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ProduceBatch" in done.stdout and "ratio" in done.stdout
    report = json.loads(out.read_text())
    assert not report["errors"]
    rows = {row["figure"]: row for row in report["rows"]}
    for figure in ("unary_1", "unary_4", "stream_produce", "produce_batch", "stream_consume",
                   "subscribe", "bulk_retrieve", "latency_subscribe_p50", "latency_stream_p99",
                   "startup_s", "idle_rss_mib", "peak_rss_mib"):
        assert rows[figure]["smq"] is not None and rows[figure]["smq"] > 0, figure
        assert rows[figure]["raw"] is not None and rows[figure]["raw"] > 0, figure
    assert rows["msgs_per_commit_4"]["smq"] >= 1
    assert {s["server"] for s in report["samples"]} == {"smq", "raw"}
