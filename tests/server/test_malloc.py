"""glibc's malloc tuned by smq/server/malloc.py: memory freed after a burst of large buffers
goes back to the system, in a fresh process each (mallopt settings are per process)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.process  # runs fresh Python processes

BURST = """
import ctypes, sys
from smq.server import malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    assert malloc.tune()

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

def burst():
    # 30 buffers of 3 MiB, each followed by a block that stays (as a call's state stays
    # after its reply buffer is freed; too large to come from glibc's free lists), then
    # the buffers are freed.
    blocks, kept = [], []
    for _ in range(30):
        block = libc.malloc(3 << 20)
        ctypes.memset(block, 1, 3 << 20)
        blocks.append(block)
        kept.append(libc.malloc(200_000))
    for block in blocks:
        libc.free(block)
    return kept

libc.free(libc.malloc(4 << 20))  # a large block freed: glibc raises its mmap threshold
before = rss_mib()
kept = burst()
after = rss_mib()
if sys.argv[1] == "tuned":
    malloc.trim()
print(after - before, rss_mib() - before)
"""


def run_burst(mode: str) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", BURST, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kept, trimmed = map(float, done.stdout.split())
    return kept, trimmed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_buffers_go_back_to_the_system_once_tuned():
    kept, _ = run_burst("default")
    assert kept > 60, f"the control: untuned glibc kept only {kept:.0f} MiB of 90 freed"
    kept, trimmed = run_burst("tuned")
    assert kept < 10 and trimmed < 10, (kept, trimmed)
