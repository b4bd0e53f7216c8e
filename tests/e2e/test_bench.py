"""The benchmark script works (bench/bench.py --quick). No performance assertion here:
the figures are measured on a shared, noisy machine and only ever reported."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

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
    assert_wear_reported(done.stdout, report, "full")
    assert {s["server"] for s in report["samples"]} - {"redis"} == {"smq", "raw", "metrics"}
    assert_metrics_compared(done.stdout, report, ["full"])


def test_wear_only_runs_just_the_wear_phases(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--wear-only", "--repeat", "1",
         "--sizes", "100", "--modes", "normal", "--wear-messages", "100,300,300", "--no-redis",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert not report["errors"]
    assert {row["figure"] for row in report["rows"]} == {"wear_unary", "wear_stream", "wear_batch"}
    assert {s["server"] for s in report["samples"]} == {"smq"}  # no metrics part either
    assert not report["metrics_rows"]
    assert_wear_reported(done.stdout, report, "normal")
    assert "redis peer was skipped (--no-redis)" in done.stdout


def test_only_metrics_runs_just_the_metrics_comparison(tmp_path):
    """--only metrics: servers with metrics off, on (scraped) and off again, in both
    modes; the table, and scrapes that counted every call the clients made."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--only", "metrics", "--quick",
         "--modes", "full,normal", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert not report["errors"]
    assert not report["rows"] and "SMQ vs raw" not in done.stdout  # nothing else ran
    assert {s["server"] for s in report["samples"]} == {"metrics"}
    assert_metrics_compared(done.stdout, report, ["full", "normal"])


def assert_metrics_compared(stdout: str, report: dict, modes: list[str]) -> None:
    """Every arm ran both workloads in every mode, the table has a row for each (with
    figures, whatever they are: no assertion on speed), and /metrics answered every scrape
    and its last one counted exactly the calls the on server's clients made."""
    samples = [s for s in report["samples"] if s["server"] == "metrics"]
    workloads = {(s["arm"], s["mode"], s["figure"]) for s in samples if s["value"] is not None}
    assert workloads == {(arm, mode, f"metrics_{w}") for arm in ("off", "on", "off2")
                         for mode in modes for w in ("unary", "batch")} | {
        ("on", mode, "metrics_scrapes") for mode in modes}, samples
    rows = report["metrics_rows"]
    assert [(r["mode"], r["workload"]) for r in rows] == [
        (mode, w) for mode in modes for w in ("unary", "batch")]
    for row in rows:
        assert all(row["median"][arm] > 0 for arm in ("off", "on", "off2")), row
        assert row["change"] is not None and row["noise"] is not None, row
    assert "metrics on vs off" in stdout
    for label in ("Produce unary, 4 clients", "ProduceBatch (100/call), 1 client"):
        for mode in modes:
            assert re.search(rf"^{re.escape(label)}\s+{mode}\s+[\d,]+\s+[\d,]+\s+[-+]",
                             stdout, re.MULTILINE), (label, mode, stdout)
    scrapes = [s for s in samples if s["figure"] == "metrics_scrapes"]
    assert sorted(s["mode"] for s in scrapes) == sorted(modes)
    for s in scrapes:
        assert s["scrapes"] >= 1 and s["scrape_failures"] == 0, s
        assert s["made_produce"] > 0 and s["made_produce_batch"] > 0, s
        assert (s["counted_produce"], s["counted_produce_batch"]) == (
            s["made_produce"], s["made_produce_batch"]), s
    assert f"the on server's clients made: {', '.join(modes)}\n" in stdout


def test_metrics_costs_reports_every_piece(tmp_path):
    """bench/metrics_costs.py --quick runs and prints each figure (values not checked
    beyond being there: they are timings)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "metrics_costs.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr  # a stand-in the code cannot use
    for figure in ("per call, added by metrics", "per commit, _count_commit (on or off)",
                   "per scrape, server CPU", "per scrape, size",
                   "idle server CPU, metrics off / on",
                   "idle server context switches, off / on"):
        assert re.search(rf"^{re.escape(figure)}\s+[-\d.,]+", done.stdout, re.MULTILINE), (
            figure, done.stdout)


WEAR_ROW = re.compile(r"^bytes written per message, (.+?) \[B/msg\]\s+100B\s+(\w+)\s+([\d,]+)\s",
                      re.MULTILINE)


def assert_wear_reported(stdout: str, report: dict, mode: str) -> None:
    """The three wear rows are printed with positive figures (bytes written per message:
    on tmpfs they would be 0), and beside redis's when redis-server is on PATH."""
    printed = {label: int(value.replace(",", "")) for label, row_mode, value
               in WEAR_ROW.findall(stdout) if row_mode == mode}
    assert set(printed) == {"unary", "StreamProduce", "ProduceBatch (100/call)"}, stdout
    assert all(value > 0 for value in printed.values()), printed
    assert "bytes written per message (x payload)" in stdout
    rows = {row["figure"]: row for row in report["rows"]}
    for figure in ("wear_unary", "wear_stream", "wear_batch"):
        assert rows[figure]["smq"] is not None and rows[figure]["smq"] > 0, figure
    redis = [s for s in report["samples"] if s["server"] == "redis"]
    if "--no-redis" in report["command"] or not shutil.which("redis-server"):
        assert not redis and "redis peer was skipped" in stdout
    else:
        assert "bytes written per message: SMQ vs redis" in stdout
        assert {(s["figure"], s["mode"]) for s in redis} == {
            (figure, fsync) for figure in ("wear_unary", "wear_batch")
            for fsync in ("always", "everysec")}
        assert all(s["value"] > 0 for s in redis), redis


def test_sqlite_layouts_prints_a_row_per_layout(tmp_path):
    """bench/sqlite_layouts.py runs and prints bytes written for every layout; the old
    layout writes more per single-message commit than format 4's (the reason for it)."""
    filesystem = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)],
                                capture_output=True, text=True).stdout.strip()
    if filesystem in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {filesystem}, where nothing is written to a disk")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sqlite_layouts.py"),
                             "--dir", str(tmp_path), "--messages", "300"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert len(rows) == 7, result.stdout
    figures = {(r[0], r[1], r[2], r[3]): [int(v.replace(",", "")) for v in r[4:]] for r in rows}
    assert all(v > 0 for values in figures.values() for v in values), result.stdout
    old, new = figures["old", "4096", "INCREMENTAL", "1"], figures["rowid-key", "512", "NONE", "1"]
    assert new[0] < old[0] and new[1] < old[1], result.stdout
