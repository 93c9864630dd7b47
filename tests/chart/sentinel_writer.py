"""Writes to Redis through Beam's own Sentinel client, reporting each attempt as a JSON line.

Runs inside the client pod of tests/chart/test_redis_sentinel.py (`python -m
tests.chart.sentinel_writer`), configured like the service: BEAM_REDIS_MODE=sentinel,
BEAM_REDIS_SENTINELS, BEAM_REDIS_SENTINEL_MASTER, BEAM_REDIS_PASSWORD. Every write is one
EVALSHA through `RedisStore.run` (NOSCRIPT reload, transient-error mapping and retries
included), exactly the path Beam's scripts take.

--loop: write every --interval seconds until stdin closes.
--once: a fresh client writes once, retrying until --deadline seconds have passed.
Each line: {"t": CLOCK_MONOTONIC seconds, "ok": bool, "value" | "error", "master"}.
CLOCK_MONOTONIC is one clock for the whole machine, so the test compares it with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from typing import Any

from beam.adapters.redis_store import RedisStore, Script
from beam.config import StoreSettings
from beam.errors import BeamError

PROBE_SOURCE = "return redis.call('INCR', KEYS[1])"
PROBE_KEY = "beam:{chart-test}:writes"


def _probe_script() -> Script:
    digest = hashlib.sha1(PROBE_SOURCE.encode(), usedforsecurity=False).hexdigest()
    return Script("chart_probe", PROBE_SOURCE, digest)


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps({"t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def _master(store: RedisStore) -> str:
    pool = getattr(store.client, "connection_pool", None)
    address = getattr(pool, "master_address", None)
    return f"{address[0]}:{address[1]}" if address else ""


async def _write(store: RedisStore) -> None:
    try:
        value = await store.run("chart_probe", [PROBE_KEY], [], idempotent=True)
    except BeamError as error:
        _emit(ok=False, error=f"{error.reason.value}: {error}", master=await _master(store))
    except Exception as error:
        _emit(ok=False, error=f"{type(error).__name__}: {error}", master=await _master(store))
    else:
        _emit(ok=True, value=int(value), master=await _master(store))


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--deadline", type=float, default=30.0)
    options = parser.parse_args(argv)
    store = RedisStore.connect(StoreSettings())
    store.scripts["chart_probe"] = _probe_script()
    try:
        if options.loop:
            stop = asyncio.ensure_future(_stdin_closed())
            while not stop.done():
                await _write(store)
                await asyncio.sleep(options.interval)
            return 0
        deadline = time.monotonic() + options.deadline
        while time.monotonic() < deadline:
            try:
                value = await store.run("chart_probe", [PROBE_KEY], [], idempotent=True)
            except Exception as error:
                _emit(
                    ok=False, error=f"{type(error).__name__}: {error}", master=await _master(store)
                )
                await asyncio.sleep(0.5)
                continue
            _emit(ok=True, value=int(value), master=await _master(store))
            return 0
        return 1
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
