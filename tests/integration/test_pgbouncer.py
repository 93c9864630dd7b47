"""Beam's money path through a real PgBouncer in transaction mode (issue 18 item 11).

Debian 12 ships PgBouncer 1.18, which predates max_prepared_statements (1.21) and refuses
the setting: in transaction mode each transaction may run on another server connection, so
a statement asyncpg prepared (and cached, by name) on one is missing on the next. That is the
case BEAM_DATABASE_STATEMENT_CACHE_SIZE=0 is for (any pooler that does not track prepared
statements); the chart sets it when pgbouncer.maxPreparedStatements is 0.
tests/chart/test_pgbouncer.py runs the chart's own pgbouncer.ini and its shutdown hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.records import Customer, Role
from tests.support.pgbouncer import PgBouncer
from tests.support.stack import Stores, Tenant

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pooler-password"
# Two server connections for many clients: transactions keep moving between them.
TRANSACTION_MODE_INI = """[databases]
beam = host=127.0.0.1 port={port} dbname=beam

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 0
unix_socket_dir =
auth_type = scram-sha-256
auth_file = /run/pgbouncer/userlist.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 100
max_db_connections = 2
ignore_startup_parameters = extra_float_digits
"""


@pytest.fixture
def pgbouncer(stores: Stores, tmp_path: Path) -> Iterator[PgBouncer]:
    assert stores.postgres is not None
    ini = TRANSACTION_MODE_INI.format(port=stores.postgres.port)
    bouncer = PgBouncer(tmp_path / "pgbouncer", ini, user="beam", password=PASSWORD).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


async def test_a_cached_statement_is_missing_on_the_next_server_connection(
    pgbouncer: PgBouncer,
) -> None:
    """Why the switch exists: asyncpg's default cache, behind a pooler that does not track
    prepared statements, fails as soon as a client lands on another server connection."""
    first = await asyncpg.connect(pgbouncer.dsn())
    second = await asyncpg.connect(pgbouncer.dsn())
    try:
        assert await first.fetchval("SELECT $1::int + 1", 1) == 2  # prepared on server A
        async with second.transaction():  # holds server A (PgBouncer reuses the last one)
            await second.fetchval("SELECT 1")
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as error:
                await first.fetchval("SELECT $1::int + 1", 1)  # runs on server B
        assert "prepared statement" in str(error.value)
        assert "does not exist" in str(error.value)
    finally:
        await first.close()
        await second.close()


async def _lifecycle(runtime: Runtime, p: Principal, cid: str) -> tuple[int, ...]:
    """Check, deduct, finalize, credit one customer (test_lifecycle's walkthrough numbers)."""
    await runtime.admin.create_customer(p, Customer(p.tenant, cid, cid), 100_000_000)
    check = await runtime.ledger.check(p, CheckCommand(cid, "req_1", 50_000, 1.2, "gpt-4"))
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(cid, "req_1", check.request_token, 50, "gpt-4", True)
    )
    final = await runtime.ledger.finalize(
        p, FinalizeCommand(cid, "req_1", "COMPLETED_SUCCESS", 234, 487, 0, 48_700, "gpt-4")
    )
    credit = await runtime.admin.credit(p, LedgerCommand(cid, 700, "top-up", f"tx-{cid}"))
    (report,) = await runtime.admin.verify_integrity(p, cid)
    return (
        check.reserved_grains,
        deduct.consumed_grains,
        final.charged_grains,
        final.final_balance,
        credit.balance,
        report.ledger_sum_grains,
        int(report.ok),
    )


async def test_the_money_path_through_pgbouncer_with_the_statement_cache_off(
    stores: Stores, tenant: Tenant, pgbouncer: PgBouncer
) -> None:
    assert stores.postgres is not None
    settings = stores.settings(
        database_url=pgbouncer.dsn(),
        database_listen_url=stores.postgres.dsn,  # LISTEN cannot go through the pooler
        database_statement_cache_size=0,
        database_pool_min=1,
        database_pool_max=8,
        migrate_on_start=False,  # migrations connect directly (they need a session)
    )
    assert settings.database_statement_cache_size == 0
    runtime = await Runtime.create(settings, background=False)
    try:
        p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
        # Eight customers at once over two server connections.
        results = await asyncio.gather(*(_lifecycle(runtime, p, f"cus_{i}") for i in range(8)))
    finally:
        await runtime.stop()
    expected = (60_000, 3_000, 48_700, 99_951_300, 99_952_000, 99_952_000, 1)
    assert results == [expected] * 8
