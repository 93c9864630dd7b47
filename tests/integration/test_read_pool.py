"""Analytics cannot starve settlements: the read-only paths have a pool of their own (issue 18
item 6).

Usage queries, ListCustomers, GetCustomer, tenant-wide VerifyIntegrity, request history and
the operator's 24 h spend run on ``PostgresStore.read_pool`` (BEAM_DATABASE_READ_POOL_MAX);
settlements, credits, debits and the reaper keep the settlement pool (BEAM_DATABASE_POOL_MAX).
Against the real stores: with every connection of the read pool taken (as a burst of slow
analytics would), six times as many reads as the pool holds queue, while a
CheckBalance + FinalizeRequest, a credit, a debit and a reaper expiry all commit; released,
every queued read answers with the exact figures. A read that cannot get a read connection
within its wait is refused as STORE_UNAVAILABLE, naming the setting, and never borrows a
settlement connection. Through a transaction-mode PgBouncer without prepared-statement
tracking, the read pool runs with the settlement pool's statement cache setting (off). The
setting itself refuses bad values, naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from beam.config import OperatorSettings, ServiceSettings, StoreSettings
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.core.usage import Bucket, TopCustomersQuery, Usage, UsageQuery, spent_since
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from beam_operator.context import runtime_settings
from tests.support.pgbouncer import PgBouncer
from tests.support.stack import TEST_TOKEN_SECRET, Stores, Tenant

pytestmark = pytest.mark.timeout(180)

READ_POOL_MAX = 2
# Generous: a money path that needs more than this is starved, not slow.
SETTLE_DEADLINE_SECONDS = 30.0
# Longer than anything this test waits, so the queued reads are still queued at release.
LONG_READ_WAIT_SECONDS = 300.0


@pytest.fixture
async def rt(stores: Stores) -> AsyncIterator[Runtime]:
    """A Runtime with a small settlement pool (4) and a smaller read pool (2), so the read
    pool is easy to exhaust and a read on the wrong pool would show."""
    runtime = await Runtime.create(
        stores.settings(
            database_pool_min=1, database_pool_max=4, database_read_pool_max=READ_POOL_MAX
        ),
        background=False,
    )
    try:
        yield runtime
    finally:
        await runtime.stop()


class ReadPoolTaken:
    """Every connection of a runtime's read pool, held by the test as slow analytics would
    hold them; ``release`` gives them back."""

    def __init__(self, rt: Runtime) -> None:
        self.pool = rt.postgres.read_pool
        self.held: list[asyncpg.Connection] = []

    async def take(self) -> ReadPoolTaken:
        for _ in range(self.pool.get_max_size()):
            conn = await self.pool.acquire(timeout=SETTLE_DEADLINE_SECONDS)
            assert await conn.fetchval("SELECT 1") == 1  # a live connection, not a promise
            self.held.append(conn)
        return self

    async def release(self) -> None:
        while self.held:
            await self.pool.release(self.held.pop())


async def _settled(awaitable: Awaitable[Any]) -> Any:
    """A money call, which must finish while the read pool is taken."""
    return await asyncio.wait_for(awaitable, SETTLE_DEADLINE_SECONDS)


async def _customers(rt: Runtime, tenant: Tenant) -> Principal:
    """c1 (1 000 000 grains) with one settled request r0 ("cheap": 100 prompt + 200
    completion tokens = 500 grains), and c2 (500 000 grains, holds expire after 60 s)."""
    p = Principal(tenant.name, Role.ADMIN, "read-pool", frozenset())
    await rt.admin.create_customer(p, Customer(tenant.name, "c1", "c1"), 1_000_000)
    await rt.admin.create_customer(p, Customer(tenant.name, "c2", "c2"), 500_000)
    stored, _ = await rt.postgres.upsert_customer(
        Customer(tenant.name, "c2", "c2", hold_ttl_seconds=60)
    )
    await rt.ledger.load_account(stored)
    check = await rt.ledger.check(p, CheckCommand("c1", "r0", 10_000, 1.0, "cheap"))
    r0 = await rt.ledger.finalize(
        p, FinalizeCommand("c1", "r0", "COMPLETED_SUCCESS", 100, 200, 0, 0, "cheap",
                           check.request_token),
    )  # fmt: skip
    assert (r0.charged_grains, r0.final_balance) == (500, 999_500)
    return p


def _reads(rt: Runtime, usage: Usage, p: Principal) -> dict[str, asyncio.Task[Any]]:
    """Every read-only path, started at once: the calls as the API makes them, and each
    store query on its own (an API call that reads twice would stop at its first read, and
    hide where its second goes). Six times what the read pool holds."""
    later = datetime.now(UTC) + timedelta(hours=2)  # the reaper's expiry is 61 s ahead
    calls: dict[str, Awaitable[Any]] = {
        "customer_usage": usage.customer_usage(p, UsageQuery("c1", bucket="day"), later),
        "top_customers": usage.top_customers(p, TopCustomersQuery(), later),
        "spent_since": spent_since(rt.postgres, p.tenant, "c1", timedelta(days=1)),
        "list_customers": rt.admin.list_customers(p, 10),
        "get_customer": rt.admin.get_customer(p, "c1"),
        "verify_integrity": rt.admin.verify_integrity(p),  # tenant-wide
        "verify_one": rt.admin.verify_integrity(p, "c2"),
        "list_requests": rt.admin.list_requests(p, "c1", 10),
        "get_request": rt.admin.get_request(p, "r0"),
        "store.usage_buckets": usage.store.customer_usage(
            p.tenant, "c1", later - timedelta(days=2), later, Bucket.DAY, by_model=True, limit=10
        ),
        "store.list_requests": rt.postgres.list_requests(p.tenant, "c1", 10),
        "store.ledger_summary": rt.postgres.ledger_summary(p.tenant, ["c1", "c2"]),
    }
    assert len(calls) == 6 * READ_POOL_MAX
    return {name: asyncio.ensure_future(call) for name, call in calls.items()}


async def _move_money(rt: Runtime, p: Principal) -> None:
    """A Check + Finalize, a credit, a debit on c1 and a reaper expiry on c2, each with its
    exact result. c1 ends at 1 000 000, c2 at 499 700."""
    check = await _settled(rt.ledger.check(p, CheckCommand("c1", "r1", 10_000, 1.0, "cheap")))
    assert check.approved
    final = await _settled(
        rt.ledger.finalize(p, FinalizeCommand("c1", "r1", "COMPLETED_SUCCESS", 300, 350, 0, 0,
                                              "cheap", check.request_token))
    )  # fmt: skip
    assert (final.charged_grains, final.final_balance, final.replayed) == (1_000, 998_500, False)
    credit = await _settled(rt.admin.credit(p, LedgerCommand("c1", 2_000, "top-up", "inv-rp")))
    assert (credit.balance, credit.replayed) == (1_000_500, False)
    debit = await _settled(rt.admin.debit(p, LedgerCommand("c1", 500, "fee", "fee-rp")))
    assert (debit.balance, debit.replayed) == (1_000_000, False)
    # c2: a hold streams 150 completion tokens (300 grains), expires, and the reaper settles it.
    hold = await _settled(rt.ledger.check(p, CheckCommand("c2", "x1", 10_000, 1.0, "cheap")))
    await _settled(
        rt.ledger.deduct(p, DeductCommand("c2", "x1", hold.request_token, 150, "", True, 1))
    )
    faults.advance(61_000)
    await _settled(rt.ledger.balance(p, "c2"))  # moves the hold to the expiring set
    await _settled(rt.reaper.run_once())
    expired = await _settled(rt.postgres.find_settlement(p.tenant, "c2", "x1"))
    assert expired is not None
    assert (expired.status.value, expired.charged_grains) == ("expired", 300)
    balance = await _settled(rt.ledger.balance(p, "c2"))
    assert (balance.balance, balance.reserved) == (499_700, 0)


async def test_queued_analytics_never_hold_up_a_settlement(rt: Runtime, tenant: Tenant) -> None:
    assert rt.postgres.read_pool is not rt.postgres.pool
    read_pool = rt.postgres.read_pool
    assert (read_pool.get_min_size(), read_pool.get_max_size()) == (0, READ_POOL_MAX)
    p = await _customers(rt, tenant)
    rt.postgres.read_wait_seconds = LONG_READ_WAIT_SECONDS
    usage = Usage(rt.postgres)
    # Which engine answers (plain PostgreSQL here) is asked once and kept: ask it now, so
    # the usage queries below go straight to their own query.
    assert (await usage.top_customers(p, TopCustomersQuery())).customers[0].customer_id == "c1"
    taken = await ReadPoolTaken(rt).take()
    try:
        reads = _reads(rt, usage, p)
        await _move_money(rt, p)
        # Every read is still waiting for a read connection: none took a settlement one.
        assert [name for name, task in reads.items() if task.done()] == []
    finally:
        await taken.release()
    answers = await asyncio.wait_for(asyncio.gather(*reads.values()), 60)
    done = dict(zip(reads, answers, strict=True))

    rows = done["customer_usage"].rows
    assert (sum(r.requests for r in rows), sum(r.charged_grains for r in rows)) == (2, 1_500)
    assert (sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows)) == (
        400,
        550,
    )
    top = [(c.customer_id, c.requests, c.charged_grains) for c in done["top_customers"].customers]
    assert top == [("c1", 2, 1_500), ("c2", 1, 300)]
    assert done["spent_since"] == 1_500
    views = [(v.customer.customer_id, v.customer.balance_grains, v.reserved)
             for v in done["list_customers"]]  # fmt: skip
    assert views == [("c1", 1_000_000, 0), ("c2", 499_700, 0)]
    assert done["get_customer"].customer.balance_grains == 1_000_000
    integrity = done["verify_integrity"]
    assert [(r.customer_id, r.ledger_sum_grains, r.problems) for r in integrity] == [
        ("c1", 1_000_000, []),
        ("c2", 499_700, []),
    ]
    assert [(s.request_id, s.charged_grains) for s in done["list_requests"]] == [
        ("r1", 1_000),
        ("r0", 500),
    ]
    assert (done["get_request"].customer_id, done["get_request"].charged_grains) == ("c1", 500)
    buckets = done["store.usage_buckets"]  # one day, or two if the test ran over midnight
    assert {r.model for r in buckets} == {"cheap"}
    assert (sum(r.requests for r in buckets), sum(r.charged_grains for r in buckets)) == (2, 1_500)
    assert [r.request_id for r in done["store.list_requests"]] == ["r1", "r0"]
    assert [(r["customer_id"], r["ledger_sum"]) for r in done["store.ledger_summary"]] == [
        ("c1", 1_000_000),
        ("c2", 499_700),
    ]
    (one,) = done["verify_one"]
    assert (one.customer_id, one.ledger_sum_grains, one.problems) == ("c2", 499_700, [])


async def test_a_read_waits_for_a_read_connection_within_a_bound(
    rt: Runtime, tenant: Tenant
) -> None:
    """Past its wait, a read is refused (STORE_UNAVAILABLE, which clients retry), naming the
    setting to raise; meanwhile money moves, and afterwards the read pool serves again."""
    p = await _customers(rt, tenant)
    rt.postgres.read_wait_seconds = 0.5
    usage = Usage(rt.postgres)
    taken = await ReadPoolTaken(rt).take()
    try:
        refused = {
            "list_customers": rt.admin.list_customers(p, 10),
            "verify_integrity": rt.admin.verify_integrity(p),
            "top_customers": usage.top_customers(p, TopCustomersQuery()),  # UsageStore's own
            "spent_since": spent_since(rt.postgres, p.tenant, "c1", timedelta(days=1)),
        }
        for name, call in refused.items():
            with pytest.raises(BeamError) as error:
                await asyncio.wait_for(call, SETTLE_DEADLINE_SECONDS)
            assert error.value.reason is Reason.STORE_UNAVAILABLE, name
            assert "BEAM_DATABASE_READ_POOL_MAX" in error.value.message, name
            assert f"all {READ_POOL_MAX}" in error.value.message, name
        await _move_money(rt, p)
    finally:
        await taken.release()
    views = await asyncio.wait_for(rt.admin.list_customers(p, 10), SETTLE_DEADLINE_SECONDS)
    assert [(v.customer.customer_id, v.customer.balance_grains) for v in views] == [
        ("c1", 1_000_000),
        ("c2", 499_700),
    ]
    assert rt.postgres.read_pool.get_size() <= READ_POOL_MAX


async def test_closing_the_store_closes_the_read_pool(stores: Stores, tenant: Tenant) -> None:
    runtime = await Runtime.create(
        stores.settings(database_pool_min=1, database_pool_max=2, database_read_pool_max=1),
        background=False,
    )
    p = Principal(tenant.name, Role.ADMIN, "read-pool", frozenset())
    assert await runtime.admin.list_customers(p, 10) == []  # opens the read connection
    read_pool, pool = runtime.postgres.read_pool, runtime.postgres.pool
    assert read_pool.get_size() == 1
    await runtime.stop()
    assert (read_pool.is_closing(), pool.is_closing()) == (True, True)
    assert read_pool.get_size() == 0


# -- through PgBouncer (transaction mode, no prepared-statement tracking) --------------------

PASSWORD = "pooler-password"
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


async def test_the_read_pool_goes_through_pgbouncer_with_the_statement_cache_off(
    stores: Stores, tenant: Tenant, pgbouncer: PgBouncer
) -> None:
    """Reads on four read connections and settlements on the settlement pool, interleaved
    over PgBouncer's two server connections: a named statement the read pool cached on one
    server connection would be missing on the next ("prepared statement does not exist")."""
    assert stores.postgres is not None
    settings = stores.settings(
        database_url=pgbouncer.dsn(),
        database_listen_url=stores.postgres.dsn,  # LISTEN cannot go through the pooler
        database_statement_cache_size=0,
        database_pool_min=1,
        database_pool_max=4,
        database_read_pool_max=4,
        migrate_on_start=False,
    )
    runtime = await Runtime.create(settings, background=False)
    try:
        p = await _customers(runtime, tenant)
        usage = Usage(runtime.postgres)

        async def settle(i: int) -> int:
            check = await runtime.ledger.check(p, CheckCommand("c1", f"b{i}", 10_000, 1.0,
                                                               "cheap"))  # fmt: skip
            final = await runtime.ledger.finalize(p, FinalizeCommand(
                "c1", f"b{i}", "COMPLETED_SUCCESS", 10, 20, 0, 0, "cheap", check.request_token
            ))  # fmt: skip
            return int(final.charged_grains)

        for round_ in range(5):
            admin, _ = await asyncio.gather(
                asyncio.gather(
                    settle(round_),
                    runtime.admin.list_customers(p, 10),
                    runtime.admin.get_customer(p, "c2"),
                    runtime.admin.verify_integrity(p),
                    runtime.admin.list_requests(p, "c1", 100),
                    runtime.admin.get_request(p, "r0"),
                ),
                asyncio.gather(
                    usage.top_customers(p, TopCustomersQuery()),
                    usage.customer_usage(p, UsageQuery("c1", bucket="minute")),
                ),
            )
            charged, customers, c2, integrity, _, r0 = admin
            assert charged == 50
            assert [v.customer.customer_id for v in customers] == ["c1", "c2"]
            assert c2.customer.balance_grains == 500_000
            # (not .ok: a settlement in flight between its commit and Redis is not drift)
            assert [r.customer_id for r in integrity] == ["c1", "c2"]
            assert r0.charged_grains == 500
        requests = await runtime.admin.list_requests(p, "c1", 100)
        assert sorted(s.request_id for s in requests) == ["b0", "b1", "b2", "b3", "b4", "r0"]
        (report,) = await runtime.admin.verify_integrity(p, "c1")
        assert (report.ledger_sum_grains, report.problems) == (1_000_000 - 500 - 5 * 50, [])
    finally:
        await runtime.stop()


# -- the setting ---------------------------------------------------------------------------------


def test_the_read_pool_size_defaults_small_and_refuses_bad_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert StoreSettings().database_read_pool_max == 4
    monkeypatch.setenv("BEAM_DATABASE_READ_POOL_MAX", "6")
    assert StoreSettings().database_read_pool_max == 6
    for bad, complaint in (
        ("0", "greater than or equal to 1"),
        ("101", "less than or equal to 100"),
        ("-1", "greater than or equal to 1"),
        ("four", "valid integer"),
        ("2.5", "valid integer"),
    ):
        monkeypatch.setenv("BEAM_DATABASE_READ_POOL_MAX", bad)
        with pytest.raises(ValidationError) as error:
            ServiceSettings(request_token_secret=TEST_TOKEN_SECRET)
        assert error.value.error_count() == 1
        (problem,) = error.value.errors()
        assert problem["loc"] == ("database_read_pool_max",), bad
        assert "database_read_pool_max" in str(error.value)
        assert complaint in str(error.value), (bad, str(error.value))
    monkeypatch.delenv("BEAM_DATABASE_READ_POOL_MAX")
    # The operator's Runtime gets the operator's own value (its customers' status reads).
    operator = OperatorSettings(database_read_pool_max=2)
    assert runtime_settings(operator).database_read_pool_max == 2
