"""Message time: the wall clock plus an offset that absorbs its steps, so that age
retention never deletes a message because the clock moved.

Boards without a real-time clock (every Raspberry Pi) start with a wrong time and let
NTP step it later, by days or years. Age retention measures a message's age from the
time stored with it (time_marks), in *message time*: the wall clock plus `offset`.
Stored times are never rewritten; the offset moves instead, and is kept in the
database (ClockState), so message time goes on where it was:

- while running, the wall clock is compared with the boot clock (CLOCK_BOOTTIME, which
  counts suspend and never steps) at every commit and every second: when the
  difference changes by STEP_SECONDS or more the wall clock stepped, and the offset
  takes the step back, so message time does not jump;
- at start in the same boot as the last run (same kernel boot id), a step made while
  SMQ was stopped is seen the same way;
- at start in another boot, no clock spans the time between: a board whose clock was
  wrong during the last boot (no real-time clock, NTP not synced) and right now looks
  like one that was off for that long. So message time resumes from the newest stored
  time, as it does in any boot when the clock is behind the newest stored time or
  stored times are from before this version was released (written before the clock
  was set). The time SMQ was stopped then does not count, which keeps messages longer,
  never shorter, and not forever (their age grows while SMQ runs).

Backward steps are taken back too: message time never goes back, so ages keep
growing and messages still expire.

The writer owns a MessageClock and calls it under its commit lock; tests pass their
own time sources.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

STEP_SECONDS = 2  # smaller changes are reading jitter or NTP's slewing (0.5 ms a second)
# No SMQ of this version ran before this day: an earlier time means an unset clock.
RELEASED = int(datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp())
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def _boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _boot_id() -> str:
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""  # not Linux: steps made while SMQ was stopped go unseen


@dataclasses.dataclass(frozen=True)
class ClockState:
    """What the database keeps of message time: `offset` (message time minus wall time,
    seconds), and the kernel boot and the wall-minus-boot difference it was set in."""

    offset: int = 0
    boot_id: str = ""
    wall_minus_boot: float = 0.0


class MessageClock:
    """Message time for the writer: `tick()` once per transaction, then `now` (whole
    seconds) for every time that transaction stores or compares."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        boot: Callable[[], float] = _boot_clock,
        boot_id: Callable[[], str] = _boot_id,
    ) -> None:
        self._wall = wall
        self._boot = boot
        self._boot_id = boot_id()
        self.offset = 0
        self._wall_minus_boot = wall() - boot()
        self.now = int(wall())

    def start(self, stored: ClockState, newest: int | None) -> list[str]:
        """Set message time from what the database kept and its newest stored time.
        Returns what was detected, for the log (module docstring)."""
        wall, boot = self._wall(), self._boot()
        self._wall_minus_boot = wall - boot
        self.offset = stored.offset
        notes = []
        same_boot = bool(stored.boot_id) and stored.boot_id == self._boot_id
        if same_boot:
            step = round(self._wall_minus_boot - stored.wall_minus_boot)
            if abs(step) >= STEP_SECONDS:
                self.offset -= step
                notes.append(
                    f"the wall clock stepped {describe_shift(step)} while SMQ was stopped: "
                    "message time goes on without the step"
                )
        now = int(wall) + self.offset
        if newest is not None and newest > now + STEP_SECONDS:
            self.offset += newest - now
            notes.append(
                f"the wall clock ({_utc(int(wall))}) is behind the newest stored message "
                f"time ({_utc(newest)}): it was set back, or is not set yet (no real-time "
                "clock before NTP); message time resumes from the newest stored time, so "
                "the time SMQ was stopped does not count"
            )
        elif self.offset == 0 and newest is not None and newest < RELEASED <= now:
            self.offset -= now - newest
            notes.append(
                f"the newest stored message time ({_utc(newest)}) is from before this "
                "release: it was written before the clock was set; message time resumes "
                "from it, so the time since does not count"
            )
        elif not same_boot and newest is not None and now - newest >= STEP_SECONDS:
            self.offset -= now - newest
            notes.append(
                f"started in a new boot, {describe_duration(now - newest)} after the newest "
                f"stored message time ({_utc(newest)}) by the wall clock: no clock measures "
                "time across a reboot, and a clock that was wrong before it (no real-time "
                "clock, NTP not synced) looks the same, so that time does not count toward "
                "age retention: messages are kept longer, never shorter"
            )
        self.now = int(wall) + self.offset
        return notes

    def tick(self) -> int:
        """Read the clocks once: fix `now` for this transaction. Returns the whole seconds
        the wall clock stepped since the last tick (taken back into the offset), or 0."""
        wall, boot = self._wall(), self._boot()
        step = round(wall - boot - self._wall_minus_boot)
        self._wall_minus_boot = wall - boot
        step = step if abs(step) >= STEP_SECONDS else 0
        self.offset -= step
        self.now = int(wall) + self.offset
        return step

    def state(self) -> ClockState:
        return ClockState(self.offset, self._boot_id, self._wall_minus_boot)


def describe_shift(seconds: int) -> str:
    """'forward by 100d 0h 0m (8640000 s)', for the one log line a step gets."""
    way = "forward" if seconds > 0 else "back"
    return f"{way} by {describe_duration(abs(seconds))}"


def describe_duration(seconds: int) -> str:
    """'100d 0h 0m (8640000 s)'."""
    hours, minutes = divmod(seconds // 60, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m ({seconds} s)"


def _utc(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
