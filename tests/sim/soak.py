"""The worker side of a soak: each process keeps its own stores and runs chunks of seeds
(a module of its own, so that "spawn" workers can import it)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType

from tests.sim.runner import Runner
from tests.sim.steps import generate
from tests.sim.world import World


@dataclass
class Chunk:
    """What a worker reports for a run of seeds."""

    ran: int = 0
    steps: int = 0
    fired: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (seed, report)
    points: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)


_WORLD: World | None = None  # one per worker process, kept between chunks


def run_chunk(
    seeds: list[int], args: argparse.Namespace, bugs: frozenset[str], stop_at_failure: bool
) -> Chunk:
    return asyncio.run(_chunk(seeds, args, bugs, stop_at_failure))


async def _chunk(
    seeds: list[int], args: argparse.Namespace, bugs: frozenset[str], stop_at_failure: bool
) -> Chunk:
    global _WORLD
    if _WORLD is None:
        _WORLD = World(None)
        atexit.register(_WORLD.stop)  # "spawn" workers exit normally: their servers stop
        await asyncio.to_thread(_WORLD.start)
    world = _WORLD
    await world.connect()
    out = Chunk()
    try:
        for seed in seeds:
            schedule = generate(seed, steps=args.steps, fault_rate=args.fault_rate)
            result = await Runner(world, schedule.masked(frozenset(args.mask)), bugs).run()
            out.ran += 1
            out.steps += result.steps_run
            out.fired += result.faults_fired
            out.points.update(result.points)
            out.stats.update(result.stats)
            if not result.ok:
                out.failures.append((seed, result.report()))
                if stop_at_failure:
                    break
    finally:
        await world.disconnect()
    return out


def quiet(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING if verbose else logging.CRITICAL)


def worker_init(verbose: bool) -> None:
    """Worker set-up: quiet logs; SIGTERM/SIGHUP stop this worker's servers and exit at
    once (an exception raised into the event loop could be swallowed by a broad handler
    of the code under test)."""
    quiet(verbose)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _die)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers


def _die(number: int, _frame: FrameType | None) -> None:
    if _WORLD is not None:
        _WORLD.stop()
    os._exit(128 + number)
