"""What a program at start-up leaves open to others: secret files any user of the
device can read, and a TCP port where anyone may write. Each finding is one line for a
WARNING at start (smq.server.app for the server, smq.forward.main for `smq forward`);
nothing here refuses to start.

"Any user can read" means the file's permission bits for others (mode & 0o004), as
`ls -l` shows them; a directory that others cannot enter is not looked at.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable

# Settings whose value is a secret, by their variable's name (NATS_PASSWORD, NATS_TOKEN);
# a name ending in _FILE holds the path of one (NATS_PASSWORD_FILE), not the secret.
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET")
HOW_TO_CLOSE = "chmod 600 it, or have systemd pass it with LoadCredential="


def mode_if_others_read(path: str) -> int | None:
    """The file's permission bits if other users may read it, else None (also when it
    cannot be looked at: the program's own check of the file says why)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & stat.S_IROTH else None


def secret_names(env_file: str) -> list[str]:
    """The secret settings that the .env file `env_file` gives a value (empty if it is
    missing or cannot be read: the settings loader has said so already)."""
    if not os.path.isfile(env_file):
        return []
    import dotenv  # as smq.settings: only the programs that read a .env file need it

    try:
        with open(env_file, encoding="utf-8") as stream:
            values = dotenv.dotenv_values(stream=stream)
    except (OSError, UnicodeDecodeError):
        return []
    return [
        name
        for name, value in values.items()
        if value and SECRET_NAME.search(name) and not name.endswith("_FILE")
    ]


def readable_secrets(files: Iterable[tuple[str, str]], env_file: str) -> list[str]:
    """One line for each secret file other users can read: `files` are (what, path) of
    keys and secret files (empty paths skipped), `env_file` the .env file that was read,
    which counts when it holds a secret setting."""
    lines = []
    for what, path in files:
        mode = mode_if_others_read(path) if path else None
        if mode is not None:
            lines.append(
                f"{what} {path!r} can be read by every user of this device "
                f"(mode {mode:04o}): {HOW_TO_CLOSE}"
            )
    mode = mode_if_others_read(env_file)
    names = secret_names(env_file) if mode is not None else []
    if names:
        lines.append(
            f"settings file {env_file!r} holds {', '.join(names)} and can be read by every "
            f"user of this device (mode {mode:04o}): chmod 600 it"
        )
    return lines


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this device only: 127.0.0.0/8, ::1, or
    a name all of whose addresses are such (localhost). A name that does not resolve
    counts as not loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )
