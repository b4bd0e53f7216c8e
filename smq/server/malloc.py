"""glibc's malloc, tuned so that memory freed after a burst goes back to the system.

Three things keep a glibc process's RSS up after a burst of large buffers (3 MiB reply
pages, 1 MiB messages) is freed:

- one arena per thread that allocates (up to 8 per core), each keeping what its largest
  burst needed: capped at MALLOC_ARENAS;
- the dynamic mmap threshold: after a large mmapped block is freed, glibc raises the
  threshold to its size, so later buffers of that size come from the arenas, where they
  fragment and stay. Fixing the threshold (M_MMAP_THRESHOLD) turns that off: every block
  of MMAP_THRESHOLD bytes or more is its own mapping, unmapped when freed;
- free pages in the middle of an arena, which only malloc_trim() gives back: `trim()`,
  called when the memory budget has drained (smq/server/budget.py).

Elsewhere than glibc each of these does nothing. MALLOC_ARENA_MAX or
MALLOC_MMAP_THRESHOLD_ set in the environment win over ours.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
# Small enough that page and message buffers are mapped apart; large enough that the
# many small objects of a request never cost a system call each.
MMAP_THRESHOLD = 256 * 1024
# Free memory at the top of the heap beyond this goes back at once. Well above what a
# call allocates, or the heap shrinks and grows again call after call (ProduceBatch of
# 100 x 100 bytes, one client: ~43,000 msg/s at 1 MiB; at 8 or 32 MiB as before the
# tuning, 50,000-56,000 here); trim() gives the rest back once the budget has drained.
TRIM_THRESHOLD = 8 * 1024**2


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def tune(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap the arenas and fix the mmap and trim thresholds; call it before the threads
    (gRPC's, the writer) first allocate. Returns True if glibc took every setting.

    The arena cap matters most: each gRPC worker thread otherwise gets an arena of its
    own, and a 3 MiB BulkRetrieve or Subscribe page raised the server's peak RSS by ~13
    MiB at 100-byte and ~28 MiB at 10 KiB payloads in the benchmark. The process's
    threads mostly allocate under the GIL anyway."""
    libc = _libc()
    if libc is None:
        return False
    done = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        done &= libc.mallopt(M_ARENA_MAX, arenas) == 1
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done &= libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        done &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return bool(done)


def trim() -> None:
    """Give the arenas' free pages back to the system (takes each arena's lock briefly)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    """When to give freed memory back: each time the memory budget has drained after
    a burst, and besides at most every `every` seconds while the RSS is more than
    `slack` above its lowest after a trim (memory the budget does not see, such as
    requests gRPC is still receiving, may have been freed meanwhile). Called from the
    budget's watcher thread once a second."""

    def __init__(self, slack: int = 16 * 1024**2, every: float = 10.0) -> None:
        self.slack = slack
        self.every = every
        self._floor = resident_bytes()
        self._last = 0.0
        self.trims = 0

    def tick(self, drained: bool, now: float) -> bool:
        """Trim if it is time to; True if it did."""
        grown = resident_bytes() - self._floor > self.slack and now - self._last >= self.every
        if not (drained or grown):
            return False
        trim()
        self._floor = min(self._floor, resident_bytes()) if self.trims else resident_bytes()
        self._last = now
        self.trims += 1
        return True
