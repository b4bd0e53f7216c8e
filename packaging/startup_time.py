"""Measure a PEX's start-up: spawn -> its port accepts TCP connections.

  python3 packaging/startup_time.py PEX [--runs N] [--python PY]

cold: every run with an empty PEX_ROOT (the first run on a board: pex installs its
venv under PEX_ROOT, then serves); warm: runs with the PEX_ROOT the cold runs left.
Each run starts on an empty database, waits for the port, then SIGTERMs the server.
Prints median, min and max seconds for each, and the PEX_ROOT's size after a run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(cmd: list[str], pex_root: Path, work: Path) -> float:
    port = free_port()
    db = work / f"db-{port}.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEX_", "SMQ_"))}
    env["PEX_ROOT"] = str(pex_root)
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--bind", "127.0.0.1", "--dbpath", str(db)],
                            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return time.monotonic() - t0
            if proc.poll() is not None:
                raise SystemExit(f"server exited {proc.returncode}")
            if time.monotonic() - t0 > 300:
                raise SystemExit("no start in 300 s")
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


def du(path: Path) -> int:
    """Bytes on disk under path, each hard-linked file once (like `du -s`)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024


def summary(label: str, values: list[float]) -> str:
    return (f"{label}: median {statistics.median(values):.3f}s  min {min(values):.3f}s  "
            f"max {max(values):.3f}s  ({len(values)} runs)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pex")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--python", help="run as `PYTHON PEX` instead of ./PEX")
    args = parser.parse_args()
    cmd = ([args.python] if args.python else []) + [str(Path(args.pex).resolve())]
    work = Path(tempfile.mkdtemp(prefix="smq-startup-"))
    try:
        cold, warm = [], []
        for _ in range(args.runs):
            root = work / "pex-root"
            shutil.rmtree(root, ignore_errors=True)
            cold.append(start_once(cmd, root, work))
        size = du(work / "pex-root")
        for _ in range(args.runs):
            warm.append(start_once(cmd, work / "pex-root", work))
        print(f"{Path(args.pex).name} ({os.path.getsize(args.pex) / 1e6:.1f} MB), "
              f"start-up to accepting connections:")
        print("  " + summary("cold (empty PEX_ROOT)", cold))
        print("  " + summary("warm", warm))
        print(f"  PEX_ROOT after the first run: {size / 1e6:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
