"""``python -m tests.sim``: replay one seed, or soak thousands.

    python -m tests.sim --seed 42                 # one schedule, its steps printed
    python -m tests.sim --seed 42 --trace         # ... with every call's answer
    python -m tests.sim --seeds 10000 --jobs 2    # seeds 0..9999 in 2 processes
    python -m tests.sim --seeds 500 --start 7000  # seeds 7000..7499
    python -m tests.sim --seed 42 --bug free_reuse    # with a known defect switched on
    python -m tests.sim --seed 42 --shrink        # a failing seed, reduced to few steps
    python -m tests.sim --replay schedule.json    # a schedule printed by --shrink
    python -m tests.sim --seeds 2000 --mask redis_restart --mask crash@credit.committed
                                                  # look past known findings

Each process starts its own PostgreSQL and Redis (beam_dev.servers) in a temporary directory
(or ``--workdir``) and stops them at the end. Exit status 1 if any schedule violated an
invariant; the soak ends with the count, the duration and schedules/s.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import platform
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from beam.core import faults
from beam_dev import servers as devservers
from tests.sim.runner import Runner
from tests.sim.shrink import shrink
from tests.sim.soak import Chunk, quiet, run_chunk, worker_init
from tests.sim.steps import Schedule, generate
from tests.sim.world import World

BUGS = {
    "free_reuse": faults.BUG_FREE_REUSE,
    "unshielded_commit": faults.BUG_UNSHIELDED_COMMIT,
    "reaper_poison": faults.BUG_REAPER_POISON,
}
CHUNK = 50  # seeds a worker runs before reporting back


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--seed", type=int, help="run (replay) one seed and print its schedule")
    what.add_argument("--seeds", type=int, help="soak: run this many seeds")
    what.add_argument("--replay", type=Path, help="run a schedule saved as JSON")
    parser.add_argument("--start", type=int, default=0, help="first seed of a soak")
    parser.add_argument("--jobs", type=int, default=1, help="soak: worker processes")
    parser.add_argument("--steps", type=int, help="steps per schedule (default: 20-60)")
    parser.add_argument("--fault-rate", type=float, help="chance a call gets a fault")
    parser.add_argument("--bug", action="append", default=[], choices=sorted(BUGS))
    parser.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="KIND@POINT",
        help="drop these faults from every schedule (a known finding), e.g. "
        "crash@credit.committed (* matches any kind or point), or a step kind, e.g. "
        "redis_restart",
    )
    parser.add_argument("--shrink", action="store_true", help="reduce a failing schedule")
    parser.add_argument("--keep-going", action="store_true", help="soak past failures")
    parser.add_argument("--workdir", type=Path, help="where the stores live (default: tmp)")
    parser.add_argument("--verbose", action="store_true", help="log the core's warnings")
    parser.add_argument("--trace", action="store_true", help="print every call's outcome")
    parser.add_argument("--stats", action="store_true", help="soak: calls by kind and answer")
    return parser.parse_args(argv)


# -- one schedule -------------------------------------------------------------------------


async def _one(args: argparse.Namespace, bugs: frozenset[str]) -> int:
    if args.replay is not None:
        schedule = Schedule.from_json(args.replay.read_text())
    else:
        schedule = generate(args.seed, steps=args.steps, fault_rate=args.fault_rate)
    schedule = schedule.masked(frozenset(args.mask))
    world = World(args.workdir)
    await asyncio.to_thread(world.start)
    try:
        await world.connect()
        result = await Runner(world, schedule, bugs, print if args.trace else None).run()
        print(result.report())
        if result.ok:
            print(schedule.describe())
            print(f"faults fired: {result.faults_fired}; points passed: {dict(result.points)}")
            return 0
        if args.shrink:
            small = await shrink(world, result, bugs, log=print)
            print("\nshrunk:\n" + small.report())
            print("\nJSON (python -m tests.sim --replay FILE):\n" + small.schedule.to_json())
        return 1
    finally:
        await world.disconnect()
        await asyncio.to_thread(world.stop)


# -- a soak -------------------------------------------------------------------------------


def _soak(args: argparse.Namespace, bugs: frozenset[str]) -> int:
    started = time.monotonic()
    seeds = list(range(args.start, args.start + args.seeds))
    chunks = [seeds[i : i + CHUNK] for i in range(0, len(seeds), CHUNK)]
    total = Chunk()
    stop = not args.keep_going
    jobs = max(1, args.jobs)
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, _stop_workers)
    context = multiprocessing.get_context("spawn")  # not fork: workers must run atexit
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=worker_init, initargs=(args.verbose,)
    ) as pool:
        pending = [pool.submit(run_chunk, chunk, args, bugs, stop) for chunk in chunks]
        try:
            for future in concurrent.futures.as_completed(pending):
                part = future.result()
                total.ran += part.ran
                total.steps += part.steps
                total.fired += part.fired
                total.points.update(part.points)
                total.stats.update(part.stats)
                for _, report in part.failures:
                    print(report, flush=True)
                total.failures += part.failures
                elapsed = time.monotonic() - started
                print(
                    f"{total.ran}/{len(seeds)} schedules, {len(total.failures)} failing, "
                    f"{elapsed:.0f}s ({total.ran / elapsed:.2f} schedules/s)",
                    flush=True,
                )
                if total.failures and stop:
                    break
        finally:
            for future in pending:
                future.cancel()
    elapsed = time.monotonic() - started
    print(
        f"\nsoak: {total.ran} schedules (seeds from {args.start}), {total.steps} steps, "
        f"{total.fired} faults injected, in {elapsed:.1f}s = {total.ran / elapsed:.2f} "
        f"schedules/s ({total.steps / elapsed:.0f} steps/s), {jobs} process(es), on "
        f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})"
    )
    print(f"fault points passed: {dict(sorted(total.points.items()))}")
    if args.stats:
        print("calls by answer:")
        for name, n in sorted(total.stats.items()):
            print(f"  {n:7d}  {name}")
    if total.failures:
        print(f"FAILING seeds: {sorted(s for s, _ in total.failures)}")
        return 1
    print("no invariant violated")
    return 0


def _stop_workers(number: int, _frame: FrameType | None) -> None:
    """A signal to the soak: every worker stops its servers, then the soak exits."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(60)
    os._exit(128 + number)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    quiet(args.verbose)
    bugs = frozenset(BUGS[b] for b in args.bug)
    if args.seeds is not None:
        return _soak(args, bugs)
    devservers.stop_servers_on_signals()
    return asyncio.run(_one(args, bugs))


if __name__ == "__main__":
    sys.exit(main())
