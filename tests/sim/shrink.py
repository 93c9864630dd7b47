"""Shrinking: reduce a failing schedule to fewer steps that still fail the same way.

Greedy delta debugging: try removing chunks of steps (halves, then quarters, ... then
single steps), keep any removal after which the same invariant is still violated, and
stop after a bounded number of runs. Steps carry no run-time values, so any subset of a
schedule is itself a valid schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from tests.sim.runner import Result, Runner
from tests.sim.world import World

MAX_RUNS = 200


async def shrink(
    world: World,
    failing: Result,
    bugs: frozenset[str] = frozenset(),
    *,
    max_runs: int = MAX_RUNS,
    log: Callable[[str], object] | None = None,
) -> Result:
    assert failing.violation is not None
    invariant = failing.violation.invariant
    best = failing
    steps = list(failing.schedule.steps[: failing.violation.step + 1])
    runs = 0
    chunk = max(1, len(steps) // 2)
    while chunk >= 1 and runs < max_runs:
        start = 0
        removed_any = False
        while start < len(steps) and runs < max_runs:
            candidate = steps[:start] + steps[start + chunk :]
            runs += 1
            schedule = failing.schedule.with_steps(candidate)
            schedule = replace(schedule, options={**schedule.options, "edited": True})
            result = await Runner(world, schedule, bugs).run()
            if result.violation is not None and result.violation.invariant == invariant:
                steps = list(candidate[: result.violation.step + 1])
                best = result
                removed_any = True
                if log is not None:
                    log(f"shrink: {len(steps)} steps still violate {invariant}")
            else:
                start += chunk
        if not removed_any:
            chunk //= 2
    return best
