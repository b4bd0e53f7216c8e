"""Smoke-test one image of SMQ's OCI archive without a container runtime (run as root).

  python3 packaging/smoke_image.py ARCHIVE ARCH [--client-pex X86_PEX] [--json OUT]

Unpacks ARCH's root file system from ARCHIVE (packaging/oci_image.py) and runs the
image's Entrypoint as a container would: chrooted in that root, as the image's User,
with only the image's Env (a foreign architecture runs through qemu-user and
binfmt_misc, see packaging/verify-arm64). From this host it then drives the steps of
packaging/smoke_pex.py (start, produce and consume 20 messages, SIGTERM -> exit 0,
start again on the same database, `--version`, `serve --help`, a newer database
refused), and one more: a start with no flags at all, `PORT` from the environment and
the database at the image's `DB_PATH`. Exit 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oci_image import extract, image_configs  # type: ignore[import-not-found]
from smoke_pex import (  # type: ignore[import-not-found]
    SERVING,
    Smoke,
    free_port,
    port_open,
    terminate,
)

MOUNT_AND_EXEC = 'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" || exit 97; exec "$@"'


class ImageTarget:
    """The server as the image runs it, in ROOT; paths are the server's view."""

    def __init__(self, root: Path, config: dict) -> None:
        self.root = root
        c = config["config"]
        self.entrypoint: list[str] = c["Entrypoint"]
        self.env: list[str] = c["Env"]
        self.user: str = c["User"]
        self.data = Path(c["WorkingDir"]) / "smoke"  # inside the image's /data volume
        self.host(self.data).mkdir()
        self.own(self.host(self.data))

    def own(self, path: Path) -> None:
        uid, gid = (int(x) for x in self.user.split(":"))
        os.chown(path, uid, gid)

    def host(self, path: Path | str) -> Path:
        return self.root / str(path).lstrip("/")

    def command(
        self, *args: str, env: tuple[str, ...] = ()
    ) -> tuple[list[str], dict[str, str] | None]:
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            MOUNT_AND_EXEC,
            str(self.root),
            "env",
            "-i",
            *self.env,
            *env,
            "/usr/sbin/chroot",
            f"--userspec={self.user}",
            str(self.root),
            *self.entrypoint,
            *args,
        ], None


def env_start(smoke: Smoke, target: ImageTarget) -> None:
    """No flags: the port from PORT, the database at the image's DB_PATH."""
    port = free_port()
    db_path = next(e.split("=", 1)[1] for e in target.env if e.startswith("DB_PATH="))
    cmd, _ = target.command(env=(f"PORT={port}",))
    log = smoke.work / "env.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    t0 = time.monotonic()
    while time.monotonic() - t0 < smoke.timeout and proc.poll() is None:
        if port_open(port) and SERVING.search(log.read_text()):
            break
        time.sleep(0.05)
    serving = SERVING.search(log.read_text())
    created = target.host(db_path).exists()
    code = terminate(proc)
    smoke.step(
        "PORT and DB_PATH from the environment",
        bool(serving) and serving.group(1) == str(port) and created and code == 0,
        port=port,
        db=db_path,
        db_created=created,
        exit=code,
        **({} if code == 0 and serving else {"log": log.read_text()[-2000:]}),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive")
    parser.add_argument("arch", choices=["amd64", "arm64"])
    parser.add_argument("--client-pex", help="run the client with this (host) PEX's environment")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per start")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix=f"smq-image-{args.arch}-", dir="/var/tmp"))
    root.chmod(0o755)  # "/" for the image's user
    args.pex, args.root, args.python, args.mdwe = args.archive, str(root), None, False
    smoke = None
    try:
        extract(Path(args.archive), args.arch, root)
        config = image_configs(Path(args.archive))[args.arch]
        smoke = Smoke(args, ImageTarget(root, config))  # type: ignore[arg-type]
        smoke.report["image"] = {k: config["config"][k] for k in ("Entrypoint", "User", "Env")}
        code = smoke.main()
        env_start(smoke, smoke.target)  # type: ignore[arg-type]
        return code
    except SystemExit as exc:
        if smoke:
            smoke.report["ok"] = False
        return int(exc.code or 1)
    finally:
        if args.json and smoke:
            Path(args.json).write_text(json.dumps(smoke.report, indent=2) + "\n")
        if smoke:
            shutil.rmtree(smoke.work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
