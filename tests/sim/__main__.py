"""``python -m tests.sim``: replay one seed, or soak thousands.

    python -m tests.sim --seed 42                 # one schedule, its steps printed
    python -m tests.sim --seeds 10000             # seeds 0..9999; schedules/s at the end
    python -m tests.sim --seeds 500 --start 7000  # seeds 7000..7499
    python -m tests.sim --seed 42 --bug free_reuse    # with a known defect switched on
    python -m tests.sim --seed 42 --shrink        # a failing seed, reduced to few steps
    python -m tests.sim --replay schedule.json    # a schedule printed by --shrink

The simulator starts its own PostgreSQL and Redis (beam.devservers) in a temporary
directory (or ``--workdir``) and stops them at the end. Exit status 1 if any schedule
violated an invariant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import sys
import time
from collections import Counter
from pathlib import Path

from beam.core import faults
from tests.sim.runner import Result, Runner
from tests.sim.shrink import shrink
from tests.sim.steps import Schedule, generate
from tests.sim.world import World

BUGS = {
    "free_reuse": faults.BUG_FREE_REUSE,
    "unshielded_commit": faults.BUG_UNSHIELDED_COMMIT,
    "reaper_poison": faults.BUG_REAPER_POISON,
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--seed", type=int, help="run (replay) one seed and print its schedule")
    what.add_argument("--seeds", type=int, help="soak: run this many seeds")
    what.add_argument("--replay", type=Path, help="run a schedule saved as JSON")
    parser.add_argument("--start", type=int, default=0, help="first seed of a soak")
    parser.add_argument("--steps", type=int, help="steps per schedule (default: 20-60)")
    parser.add_argument("--fault-rate", type=float, help="chance a call gets a fault")
    parser.add_argument("--bug", action="append", default=[], choices=sorted(BUGS))
    parser.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="KIND@POINT",
        help="drop these faults from every schedule (a known finding), e.g. "
        "crash@credit.committed; * matches any kind or point",
    )
    parser.add_argument("--shrink", action="store_true", help="reduce a failing schedule")
    parser.add_argument("--keep-going", action="store_true", help="soak past failures")
    parser.add_argument("--workdir", type=Path, help="where the stores live (default: tmp)")
    parser.add_argument("--verbose", action="store_true", help="log the core's warnings")
    parser.add_argument("--trace", action="store_true", help="print every call's outcome")
    parser.add_argument("--stats", action="store_true", help="soak: calls by kind and answer")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    bugs = frozenset(BUGS[b] for b in args.bug)
    world = World(args.workdir)
    await asyncio.to_thread(world.start)
    try:
        await world.connect()
        if args.seed is not None or args.replay is not None:
            if args.replay is not None:
                schedule = Schedule.from_json(args.replay.read_text())
            else:
                schedule = generate(args.seed, steps=args.steps, fault_rate=args.fault_rate)
            schedule = schedule.masked(frozenset(args.mask))
            return await _one(world, schedule, bugs, args.shrink, args.trace)
        return await _soak(world, args, bugs)
    finally:
        await world.disconnect()
        await asyncio.to_thread(world.stop)


async def _one(
    world: World, schedule: Schedule, bugs: frozenset[str], do_shrink: bool, trace: bool
) -> int:
    result = await Runner(world, schedule, bugs, print if trace else None).run()
    print(result.report())
    if result.ok:
        print(schedule.describe())
        print(f"faults fired: {result.faults_fired}; points passed: {dict(result.points)}")
        return 0
    if do_shrink:
        small = await shrink(world, result, bugs, log=print)
        print("\nshrunk:\n" + small.report())
        print("\nJSON (python -m tests.sim --replay FILE):\n" + small.schedule.to_json())
    return 1


async def _soak(world: World, args: argparse.Namespace, bugs: frozenset[str]) -> int:
    started = time.monotonic()
    failures: list[Result] = []
    points: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    steps = fired = 0
    count = args.seeds
    for n, seed in enumerate(range(args.start, args.start + count), start=1):
        schedule = generate(seed, steps=args.steps, fault_rate=args.fault_rate)
        schedule = schedule.masked(frozenset(args.mask))
        result = await Runner(world, schedule, bugs).run()
        steps += result.steps_run
        fired += result.faults_fired
        points.update(result.points)
        stats.update(result.stats)
        if not result.ok:
            failures.append(result)
            print(result.report(), flush=True)
            if not args.keep_going:
                break
        if n % 100 == 0 or n == count:
            elapsed = time.monotonic() - started
            print(
                f"{n}/{count} schedules, {len(failures)} failing, {elapsed:.0f}s "
                f"({n / elapsed:.1f} schedules/s)",
                flush=True,
            )
    elapsed = time.monotonic() - started
    ran = args.seeds if args.keep_going or not failures else n
    print(
        f"\nsoak: {ran} schedules (seeds {args.start}..{args.start + ran - 1}), {steps} steps, "
        f"{fired} faults injected, in {elapsed:.1f}s = {ran / elapsed:.2f} schedules/s "
        f"({steps / elapsed:.0f} steps/s) on {platform.node()} "
        f"({platform.processor() or platform.machine()}, Python {platform.python_version()})"
    )
    print(f"fault points passed: {dict(sorted(points.items()))}")
    if args.stats:
        print("calls by answer:")
        for name, n in sorted(stats.items()):
            print(f"  {n:7d}  {name}")
    if failures:
        seeds = [r.schedule.seed for r in failures]
        print(f"FAILING seeds: {seeds} (replay: python -m tests.sim --seed N)")
        return 1
    print("no invariant violated")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
