"""Injected time and fault points for the money paths: inert in production.

Beam's money paths are tested by a simulator (``tests/sim``) that replays random schedules
against real Redis and PostgreSQL and checks every invariant after each step. To reach
the schedules that attackers, client deadlines and crashes choose, it needs three things
from the code, and this module is the only place they live:

* **Time.** Everything Beam computes about time (hold expiry, reaper deadlines) reads
  ``now_ms()``. The simulator sets an offset so a day passes in a millisecond. TTLs that
  Redis itself enforces (the done marker's ``EXPIRE``) are expired by the simulator
  explicitly.
* **Fault points.** ``await point("finalize.committed")`` marks an await point of a
  settlement path. With no hook installed (production) it returns at once. The simulator
  installs a hook that may cancel the calling task there, or raise ``SimulatedCrash`` to
  model ``kill -9`` (everything after the point never runs).
* **Bug switches.** ``enabled(BUG_…)`` re-introduces one known defect class so a test can
  show the simulator catches it. Nothing in production sets them; they are read only at
  the few places that fixed those defects.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

# Fault points, in the order a settlement passes them.
CHECK_OPENED: Final = "check.opened"  # hold opened, settled-id lookup not done yet
FINALIZE_BEGUN: Final = "finalize.begun"  # hold marked settling, nothing committed
FINALIZE_COMMITTED: Final = "finalize.committed"  # PostgreSQL committed, Redis not updated
ADJUST_COMMITTED: Final = "adjust.committed"  # late-Finalize adjustment committed
DEBIT_OPENED: Final = "debit.opened"  # debit hold opened, nothing committed
DEBIT_COMMITTED: Final = "debit.committed"  # debit committed, Redis not updated
CREDIT_COMMITTED: Final = "credit.committed"  # credit committed, Redis not updated
REAPER_COMMITTED: Final = "reaper.committed"  # expiry committed, hold not released
ALL_POINTS: Final = (
    CHECK_OPENED,
    FINALIZE_BEGUN,
    FINALIZE_COMMITTED,
    ADJUST_COMMITTED,
    DEBIT_OPENED,
    DEBIT_COMMITTED,
    CREDIT_COMMITTED,
    REAPER_COMMITTED,
)

# Bug switches (test-only): each re-introduces one defect class that was fixed.
BUG_FREE_REUSE: Final = "free_reuse"  # Check trusts Redis alone; settlements ignore nonces
BUG_UNSHIELDED_COMMIT: Final = "unshielded_commit"  # cancellation after commit skips Redis
BUG_REAPER_POISON: Final = "reaper_poison"  # one failing hold aborts the whole reaper pass

Hook = Callable[[str], Awaitable[None]]


class SimulatedCrash(BaseException):
    """Raised by a simulator hook: the process "dies" at this point. A BaseException so
    that no ``except Exception`` clean-up runs, as none would after ``kill -9``."""


_hook: Hook | None = None
_offset_ms = 0
_bugs: set[str] = set()


def now_ms() -> int:
    """Wall-clock milliseconds, plus the simulator's offset (0 in production)."""
    return time.time_ns() // 1_000_000 + _offset_ms


async def point(name: str) -> None:
    """A named await point of a money path; a no-op unless a simulator hook is installed."""
    if _hook is not None:
        await _hook(name)


def enabled(bug: str) -> bool:
    return bug in _bugs


# -- for the simulator and tests only -----------------------------------------------------


def install(hook: Hook | None) -> None:
    global _hook
    _hook = hook


def advance(milliseconds: int) -> None:
    global _offset_ms
    _offset_ms += milliseconds


def set_bugs(bugs: set[str]) -> None:
    _bugs.clear()
    _bugs.update(bugs)


def reset() -> None:
    global _offset_ms
    install(None)
    _offset_ms = 0
    _bugs.clear()
