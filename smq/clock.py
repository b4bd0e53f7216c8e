"""The wall clock as age retention sees it: steps noticed, so that none deletes a message.

Boards without a real-time clock (every Raspberry Pi) start with a wrong time and let
NTP step it later, by days or years. Retention measures a message's age from the time
stored with it (time_marks), so a step would make messages look older (or younger)
than they are. SMQ keeps stored times on the wall clock's scale and moves them with
every step it sees:

- while running, the wall clock is compared with the boot clock (CLOCK_BOOTTIME, which
  counts suspend and never steps): a difference that changes by STEP_SECONDS or more
  is a step, and every stored time moves by it, so each message keeps its age;
- at start, a wall clock behind the newest stored time, or stored times before this
  version was released while the wall clock is past it (written before the clock was
  set), cannot be trusted as the time that passed: stored times move so that the
  newest is now. The time SMQ was stopped does not count, which keeps messages longer,
  never shorter, and not forever.

The writer owns a WallClock; tests pass their own time sources.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable

STEP_SECONDS = 2.0  # smaller differences are reading jitter or NTP's slewing
# No SMQ of this version ran before this day: an earlier time means an unset clock.
RELEASED = int(datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc).timestamp())


def _boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class WallClock:
    """Unix time for stored message times, and the steps of the wall clock since the last
    look. Called under the writer's commit lock only."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 boot: Callable[[], float] = _boot_clock) -> None:
        self._wall = wall
        self._boot = boot
        self._offset = wall() - boot()

    def now(self) -> int:
        return int(self._wall())

    def step(self) -> int:
        """Whole seconds the wall clock jumped since the last call (or since start), or 0.
        Called at least every second, so NTP's slewing (at most 0.5 ms a second) never
        adds up to a step."""
        offset = self._wall() - self._boot()
        jump, self._offset = offset - self._offset, offset
        return round(jump) if abs(jump) >= STEP_SECONDS else 0


def start_correction(now: int, newest: int | None) -> int:
    """Seconds to move stored times by at start so that none is ahead of the clock or
    was written before the clock was set (module docstring); 0 if they can stay."""
    if newest is None:
        return 0
    if newest > now + STEP_SECONDS or newest < RELEASED <= now:
        return now - newest
    return 0


def describe_shift(seconds: int) -> str:
    """'forward by 100d 0h 0m', for the one log line a step gets."""
    way = "forward" if seconds > 0 else "back"
    minutes, _ = divmod(abs(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{way} by {days}d {hours}h {minutes}m ({abs(seconds)} s)"
