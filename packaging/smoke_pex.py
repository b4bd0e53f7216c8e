"""Smoke-test a built SMQ PEX as a user would run it, on this host or in a chroot.

  python3 packaging/smoke_pex.py PEX [--root DIR] [--client-pex X86_PEX] [--json OUT]

1. cold start: a fresh PEX_ROOT, `PEX --port P --bind 127.0.0.1 --dbpath D/smoke.db`;
   times spawn -> the port accepts TCP connections, and -> the "serving on" log line
2. produce 20 messages, consume them back (packaging/smoke_client.py, from the host)
3. SIGTERM: the server must exit 0
4. warm start on the same database: the messages are still there; SIGTERM again
5. subcommands: `PEX --version`, `PEX serve --help`
6. a database whose format is newer than this SMQ's is refused: exit 2, clear message

--root DIR runs the server chrooted in DIR (a foreign-architecture Debian root; see
packaging/verify-arm64): the PEX is copied to DIR/opt/smq/, data lives in
DIR/var/lib/smq-smoke/, and the client still runs on the host. The client runs with
this Python (which must have grpcio and smq importable: the dev venv) unless
--client-pex names an x86_64 PEX, whose own environment then runs the client.
Standard library only; exit 0 when every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# --mdwe: run the server behind prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), the kernel's
# form of systemd's MemoryDenyWriteExecute=yes (the unit in systemd/ sets it); the rule
# survives execve, so it covers the /bin/sh boot, pex's venv set-up and the server.
MDWE_WRAPPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
"""
SERVING = re.compile(r"serving on \S*?:(\d+)")
MESSAGES = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, then its exit code; after 60 s its process group is killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


class Target:
    """Where the server runs: this host, or a chroot. Paths are the server's view."""

    def __init__(self, pex: Path, root: Path | None, work: Path, python: str | None = None,
                 mdwe: bool = False) -> None:
        self.root = root
        self.python = [python] if python else []
        if mdwe:
            if root is not None:
                raise SystemExit("--mdwe is for runs on this host")
            self.python = [sys.executable, "-c", MDWE_WRAPPER, *(self.python or [])]
        if root is None:
            self.data = work / "data"
            self.pex = str(pex.resolve())
        else:
            self.data = Path("/var/lib/smq-smoke")
            (root / "opt/smq").mkdir(parents=True, exist_ok=True)
            shutil.copy2(pex, root / "opt/smq/smq.pex")
            os.chmod(root / "opt/smq/smq.pex", 0o755)
            self.pex = "/opt/smq/smq.pex"
        shutil.rmtree(self.host(self.data), ignore_errors=True)
        self.host(self.data).mkdir(parents=True)
        self.pex_root = str(self.data / "pex-root")  # fresh: the first run is a cold start

    def host(self, path: Path | str) -> Path:
        """The host's path for a path the server sees."""
        return Path(path) if self.root is None else self.root / str(path).lstrip("/")

    def own(self, path: Path) -> None:
        """Give a file the host made to the server's user (here: the same user)."""

    def command(self, *args: str) -> tuple[list[str], dict[str, str] | None]:
        if self.root is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PEX_", "SMQ_"))}
            env.update(PEX_ROOT=self.pex_root, PYTHONUNBUFFERED="1")
            return [*self.python, self.pex, *args], env
        return [str(HERE / "in-root"), str(self.root), f"PEX_ROOT={self.pex_root}",
                "PYTHONUNBUFFERED=1", *self.python, self.pex, *args], None


class Smoke:
    def __init__(self, args: argparse.Namespace, target: Target | None = None) -> None:
        """TARGET: where the server runs (default: the PEX, from ARGS); packaging/smoke_image.py
        passes an image's root file system instead."""
        self.work = Path(tempfile.mkdtemp(prefix="smq-smoke-"))
        self.target = target or Target(Path(args.pex), Path(args.root) if args.root else None, self.work,
                                       args.python, args.mdwe)
        self.client_pex = args.client_pex
        self.timeout = args.timeout
        self.report: dict = {"pex": str(args.pex), "root": args.root, "python": args.python,
                             "mdwe": args.mdwe,
                             "steps": []}

    def step(self, name: str, ok: bool, **details) -> None:
        self.report["steps"].append({"step": name, "ok": ok, **details})
        extra = " ".join(f"{k}={v}" for k, v in details.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name} {extra}", flush=True)
        if not ok:
            raise SystemExit(1)

    def run(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        cmd, env = self.target.command(*args)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=self.work,
                              timeout=timeout or self.timeout, stdin=subprocess.DEVNULL)

    def start(self, db: str, label: str) -> tuple[subprocess.Popen, int, Path]:
        port = free_port()
        log = self.work / f"{label}.log"
        cmd, env = self.target.command("--port", str(port), "--bind", "127.0.0.1", "--dbpath", db,
                                       "--log-level", "info")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=self.work,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        accepting = logged = None
        while time.monotonic() - t0 < self.timeout:
            if accepting is None and port_open(port):
                accepting = time.monotonic() - t0
            if logged is None and SERVING.search(log.read_text()):
                logged = time.monotonic() - t0
            if accepting is not None and logged is not None:
                break
            if proc.poll() is not None:
                self.step(f"{label} start", False, exit=proc.returncode, log=log.read_text()[-2000:])
            time.sleep(0.01)
        else:
            proc.kill()
            self.step(f"{label} start", False, timeout=self.timeout, log=log.read_text()[-2000:])
        self.step(f"{label} start", True, accepting_s=round(accepting, 3), serving_log_s=round(logged, 3))
        self.report[f"{label}_start_accepting_s"] = round(accepting, 3)
        return proc, port, log

    def stop(self, proc: subprocess.Popen, log: Path, label: str) -> None:
        t0 = time.monotonic()
        code = terminate(proc)
        self.step(f"{label} SIGTERM", code == 0, exit=code, seconds=round(time.monotonic() - t0, 2),
                  **({} if code == 0 else {"log": log.read_text()[-2000:]}))

    def client(self, port: int, action: str) -> None:
        script = str(HERE / "smoke_client.py")
        if self.client_pex:
            cmd = [self.client_pex, script]
            env = dict(os.environ, PEX_INTERPRETER="1")
        else:
            cmd = [sys.executable, script]
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        t0 = time.monotonic()
        result = subprocess.run([*cmd, f"127.0.0.1:{port}", action, "smoke", str(MESSAGES)],
                                env=env, capture_output=True, text=True, timeout=120)
        detail = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        self.step(f"{action} {MESSAGES} messages", result.returncode == 0,
                  seconds=round(time.monotonic() - t0, 2),
                  result=detail if result.returncode == 0 else detail + result.stderr[-1500:])

    def main(self) -> int:
        t0 = time.monotonic()
        db = str(self.target.data / "smoke.db")
        proc, port, log = self.start(db, "cold")
        self.client(port, "produce")
        self.client(port, "consume")
        self.stop(proc, log, "cold")

        proc, port, log = self.start(db, "warm")
        self.client(port, "consume")
        self.stop(proc, log, "warm")

        version = self.run("--version")
        self.step("--version", version.returncode == 0 and version.stdout.startswith("smq "),
                  output=version.stdout.strip() or version.stderr.strip()[-500:])
        helped = self.run("serve", "--help")
        self.step("serve --help", helped.returncode == 0 and "--dbpath" in helped.stdout,
                  exit=helped.returncode)

        newer = self.target.data / "newer.db"
        with sqlite3.connect(self.target.host(newer)) as conn:
            conn.execute("PRAGMA user_version = 999")
        self.target.own(self.target.host(newer))
        refused = self.run("--port", str(free_port()), "--bind", "127.0.0.1", "--dbpath", str(newer))
        message = (refused.stderr.strip().splitlines() or [""])[-1]
        self.step("newer database refused", refused.returncode == 2 and "newer SMQ" in message,
                  exit=refused.returncode, message=message)

        self.report["seconds"] = round(time.monotonic() - t0, 1)
        self.report["ok"] = True
        print(f"smoke test passed in {self.report['seconds']}s", flush=True)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pex")
    parser.add_argument("--root", help="run the server chrooted in this Debian root")
    parser.add_argument("--python", help="run the PEX as `PYTHON PEX ...` (default: ./PEX, "
                        "whose /bin/sh boot picks the oldest python3.11-3.13 on PATH)")
    parser.add_argument("--mdwe", action="store_true",
                        help="run the server with no writable+executable memory (Linux 6.3+)")
    parser.add_argument("--client-pex", help="run the client with this (host) PEX's environment")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per start")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    smoke = Smoke(args)
    try:
        return smoke.main()
    except SystemExit as exc:
        smoke.report["ok"] = False
        return int(exc.code or 1)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(smoke.report, indent=2) + "\n")
        shutil.rmtree(smoke.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
