"""Real small filesystems for disk-full and I/O-error tests: a tmpfs, an ext4 loop
device, and ext4's own shutdown ioctl. Each needs root; the test is skipped otherwise."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real small filesystem (needs root; the test is skipped otherwise)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


SBIN = "/usr/sbin:/sbin"  # not on PATH in every sandbox (Bazel's has /bin:/usr/bin)


@contextlib.contextmanager
def ext4(path: Path, size_mb: int = 64):
    """A real ext4 filesystem on a loop device (needs root; the test is skipped otherwise)."""
    image = path.with_suffix(".img")
    path.mkdir()
    with open(image, "wb") as stream:
        stream.truncate(size_mb * 1024**2)
    mkfs = shutil.which("mkfs.ext4", path=os.pathsep.join([os.environ.get("PATH", ""), SBIN]))
    if os.geteuid() != 0 or mkfs is None \
            or subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True).returncode \
            or subprocess.run(["mount", "-o", "loop", str(image), str(path)],
                              capture_output=True).returncode:
        image.unlink()
        pytest.skip("cannot mount an ext4 loop device here (needs root and mkfs.ext4)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        image.unlink()


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def shut_down_ext4(path: Path) -> None:
    """What ext4 does to itself after a fatal I/O error: every later access fails with EIO."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)
