"""The chart's PgBouncer as a real process (Debian's pgbouncer; issue 18 item 11).

The rendered pgbouncer.ini runs Beam's queries in transaction mode, and the pod's preStop hook
stops PgBouncer the safe way: SIGTERM is PgBouncer's immediate shutdown before 1.23 (in-flight
transactions cut) and from 1.23 waits for every client to leave, which a pooled asyncpg never
does (the kubelet then SIGKILLs it at the grace period, mid-transaction). The hook sends SIGINT
(finish the running transactions, then exit) and returns once PgBouncer is gone.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.chart.conftest import Helm
from tests.chart.test_render import container, env, find, render
from tests.support.pgbouncer import RUNTIME_DIR, PgBouncer, pgbouncer_version
from tests.support.stack import Stores

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pooler-password"
OLD_PGBOUNCER = ("--set", "pgbouncer.enabled=true", "--set", "pgbouncer.maxPreparedStatements=0")


def _ini(docs: list[dict[str, Any]]) -> str:
    ini: str = find(docs, "ConfigMap", "beam-pgbouncer")["data"]["pgbouncer.ini"]
    return ini


def _pointed_at(ini: str, stores: Stores) -> str:
    assert stores.postgres is not None
    return re.sub(
        r"(?m)^beam = host=\S+ port=\d+ ",
        f"beam = host=127.0.0.1 port={stores.postgres.port} ",
        ini,
    )


@pytest.fixture
def chart_pgbouncer(helm: Helm, stores: Stores, tmp_path: Path) -> Iterator[PgBouncer]:
    ini = _pointed_at(_ini(render(helm, *OLD_PGBOUNCER)), stores)
    bouncer = PgBouncer(tmp_path / "pgbouncer", ini, user="beam", password=PASSWORD).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_prepared_statements_are_tracked_by_pgbouncer_or_not_cached_by_asyncpg(
    helm: Helm,
) -> None:
    tracked = render(helm, "--set", "pgbouncer.enabled=true")
    assert "\nmax_prepared_statements = 200\n" in _ini(tracked)
    assert "BEAM_DATABASE_STATEMENT_CACHE_SIZE" not in env(
        container(tracked, "Deployment", "beam-service")
    )
    untracked = render(helm, *OLD_PGBOUNCER)
    assert "max_prepared_statements" not in _ini(untracked)  # PgBouncer < 1.21 refuses it
    assert (
        env(container(untracked, "Deployment", "beam-service"))[
            "BEAM_DATABASE_STATEMENT_CACHE_SIZE"
        ]
        == "0"
    )
    # The direct connections (operator, migrations) keep their cache.
    assert "BEAM_DATABASE_STATEMENT_CACHE_SIZE" not in env(
        container(untracked, "Deployment", "beam-operator")
    )


async def test_the_rendered_ini_pools_asyncpg_in_transaction_mode(
    helm: Helm, chart_pgbouncer: PgBouncer
) -> None:
    cache = int(
        env(container(render(helm, *OLD_PGBOUNCER), "Deployment", "beam-service"))[
            "BEAM_DATABASE_STATEMENT_CACHE_SIZE"
        ]
    )
    pool = await asyncpg.create_pool(
        chart_pgbouncer.dsn(), min_size=6, max_size=6, statement_cache_size=cache
    )
    try:

        async def work(client: int) -> int:
            total = 0
            for step in range(20):
                async with pool.acquire() as conn, conn.transaction():
                    total += await conn.fetchval("SELECT $1::int + $2::int", client, step)
            return total

        assert await asyncio.gather(*(work(c) for c in range(6))) == [
            20 * c + 190 for c in range(6)
        ]
    finally:
        await pool.close()


def _pre_stop(docs: list[dict[str, Any]]) -> list[str]:
    hook = container(docs, "Deployment", "beam-pgbouncer")["lifecycle"]["preStop"]["exec"]
    command: list[str] = hook["command"]
    return command


async def test_pre_stop_lets_the_running_transaction_finish_then_pgbouncer_exits(
    helm: Helm, stores: Stores, chart_pgbouncer: PgBouncer
) -> None:
    """A pooled asyncpg client stays connected (idle) while another pooled connection runs a
    2 s write: the hook returns once that transaction has committed and PgBouncer has exited,
    long before the 30 s grace period. (Debian's 1.18 waits for the running statement, so
    the write is one statement; see docs/OPERATIONS.md.)"""
    assert stores.postgres is not None
    command = [part.replace(RUNTIME_DIR, str(chart_pgbouncer.workdir)) for part in _pre_stop(
        render(helm, *OLD_PGBOUNCER)
    )]  # fmt: skip
    table = f"pgbouncer_shutdown_{chart_pgbouncer.port}"
    direct = await asyncpg.connect(stores.postgres.dsn)
    await direct.execute(f"CREATE TABLE {table} (id int)")
    pool = await asyncpg.create_pool(
        chart_pgbouncer.dsn(), min_size=2, max_size=2, statement_cache_size=0
    )
    process = chart_pgbouncer.process
    assert process is not None
    try:
        running = asyncio.create_task(
            pool.execute(f"INSERT INTO {table} SELECT 42 FROM pg_sleep(2)")  # noqa: S608
        )
        await asyncio.sleep(0.5)
        assert not running.done()
        started = time.monotonic()
        hook = await asyncio.create_subprocess_exec(*command)
        # Reap PgBouncer as it exits (the hook's `kill -0` sees a zombie as alive).
        exit_code = await asyncio.to_thread(process.wait, 15)
        hook_code = await asyncio.wait_for(hook.wait(), 15)
        elapsed = time.monotonic() - started
        (answer,) = await asyncio.gather(running, return_exceptions=True)
        # The transaction committed. Before 1.23 the safe shutdown closes the client before
        # it forwards the answer (the client sees an ambiguous failure, which Beam's
        # request_id / transaction_id retries resolve); 1.23+ waits for the server's release.
        assert await direct.fetch(f"SELECT id FROM {table}") == [(42,)]  # noqa: S608
        if pgbouncer_version() >= (1, 23):
            assert answer == "INSERT 0 1"
        else:
            assert isinstance(answer, asyncpg.ConnectionDoesNotExistError), answer
        assert (exit_code, hook_code) == (0, 0)
        # It waited for the write (1.5 s left), not for the idle pooled client.
        assert 1.0 < elapsed < 5.0, elapsed
        assert "got SIGINT, shutting down" in chart_pgbouncer.log_path.read_text()
    finally:
        pool.terminate()
        await direct.execute(f"DROP TABLE {table}")
        await direct.close()


def test_the_hook_fits_in_the_grace_period(helm: Helm) -> None:
    docs = render(helm, *OLD_PGBOUNCER)
    pod = find(docs, "Deployment", "beam-pgbouncer")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert "pidfile = /run/pgbouncer/pgbouncer.pid" in _ini(docs)
    assert subprocess.run(["/bin/sh", "-n", "-c", _pre_stop(docs)[-1]], check=False).returncode == 0
