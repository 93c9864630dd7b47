"""Let-through usage is labelled (issue 16, item 5), on real PostgreSQL and Redis.

A Finalize that says ``let_through`` (the app let the request through while Beam was
unreachable) is settled exactly as it would be without the label; the label lands on the
request row and on the request's usage event, and usage analytics count those requests and
their grains apart. Migration 0008 applied to a database at 0007 with history keeps the old
rows unlabelled and changes no money; on TimescaleDB it takes the aggregate's 'complete'
back (checked here with stand-ins for TimescaleDB's catalog: the test PostgreSQL has none).
Prices: "cheap" is 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from beam.adapters.migrations import migrate, migration_files
from beam.adapters.usage_store import Bucket, UsageRow, UsageStore
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand
from beam.core.runtime import Runtime
from beam.core.usage import TopCustomersQuery, Usage, UsageQuery
from beam.records import Role
from tests.integration.test_usage import (
    _append,
    _customer,
    _expire,
    _fresh_database,
    _settlement,
)
from tests.support.stack import Stores, Tenant

MIGRATION = "0008_let_through"


def _sums(rows: list[UsageRow]) -> tuple[int, int, int, int]:
    """(requests, charged grains, let-through requests, let-through grains) of the rows."""
    return (
        sum(r.requests for r in rows),
        sum(r.charged_grains for r in rows),
        sum(r.let_through_requests for r in rows),
        sum(r.let_through_grains for r in rows),
    )


async def _request_and_event(stores: Stores, tenant: str, customer_id: str,
                             request_id: str) -> tuple[bool, bool]:  # fmt: skip
    """(requests.let_through, the request's own usage event's let_through)."""
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        row = await conn.fetchrow(
            """SELECT r.let_through AS request, u.let_through AS event
               FROM requests r JOIN usage_events u
                 ON u.tenant = r.tenant AND u.customer_id = r.customer_id
                AND u.request_id = r.request_id AND u.request_count = 1
               WHERE r.tenant = $1 AND r.customer_id = $2 AND r.request_id = $3""",
            tenant,
            customer_id,
            request_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["request"], row["event"]


async def test_a_let_through_finalize_is_charged_as_any_other_and_labelled(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await _customer(runtime, p, "c1", 100_000, hold_ttl_seconds=60)
    await _customer(runtime, p, "c2", 100_000)
    # A claim (no hold, no token): cheap, 100 x 1 + 300 x 2 = 700.
    claim = FinalizeCommand("c1", "claim", "COMPLETED_SUCCESS", 100, 300, model="cheap",
                            let_through=True)  # fmt: skip
    first = await runtime.ledger.finalize(p, claim)
    assert (first.charged_grains, first.replayed) == (700, False)
    # The same usage unlabelled, for another customer: the same money.
    same = FinalizeCommand("c2", "claim", "COMPLETED_SUCCESS", 100, 300, model="cheap")
    assert (await runtime.ledger.finalize(p, same)).charged_grains == 700
    # A hold whose Deducts stopped reaching Beam mid-stream (its token, its locked price):
    # 10 + 200 x 2 = 410.
    check = await runtime.ledger.check(p, CheckCommand("c1", "mid", 1_000, 1.0, "cheap"))
    await runtime.ledger.deduct(p, DeductCommand("c1", "mid", check.request_token, 50, "",
                                                 True, 1))  # fmt: skip
    mid = await runtime.ledger.finalize(p, FinalizeCommand(
        "c1", "mid", "COMPLETED_SUCCESS", 10, 200, request_token=check.request_token,
        let_through=True,
    ))  # fmt: skip
    assert (mid.charged_grains, mid.refunded_grains) == (410, 590)
    # Replays, labelled or not, answer the stored settlement and write nothing.
    for command in (claim, FinalizeCommand("c1", "claim", "COMPLETED_SUCCESS", 100, 300,
                                           model="cheap")):  # fmt: skip
        again = await runtime.ledger.finalize(p, command)
        assert (again.charged_grains, again.final_balance, again.replayed) == (
            700, first.final_balance, True,
        )  # fmt: skip
    assert await _request_and_event(stores, tenant.name, "c1", "claim") == (True, True)
    assert await _request_and_event(stores, tenant.name, "c1", "mid") == (True, True)
    assert await _request_and_event(stores, tenant.name, "c2", "claim") == (False, False)
    requests = {s.request_id: s.let_through for s in await runtime.admin.list_requests(p, "c1", 10)}
    assert requests == {"claim": True, "mid": True}
    got = await runtime.admin.get_request(p, "claim", "c2")
    assert (got.charged_grains, got.let_through) == (700, False)
    # Money: each charge once, the same with or without the label.
    for customer_id, spent in (("c1", 1_110), ("c2", 700)):
        balance = await runtime.ledger.balance(p, customer_id)
        assert (balance.balance, balance.reserved) == (100_000 - spent, 0)
    report = await runtime.admin.verify_integrity(p)
    assert [r.problems for r in report] == [[], []]
    # Usage: within requests and charged_grains, the let-through ones apart.
    usage = Usage(runtime.postgres)
    for bucket in Bucket:
        rows = (await usage.customer_usage(p, UsageQuery("c1", bucket=bucket.value))).rows
        assert _sums(rows) == (2, 1_110, 2, 1_110), bucket
    top = await usage.top_customers(p, TopCustomersQuery())
    assert [(c.customer_id, c.requests, c.charged_grains, c.let_through_requests,
             c.let_through_grains) for c in top.customers] == [
        ("c1", 2, 1_110, 2, 1_110), ("c2", 1, 700, 0, 0),
    ]  # fmt: skip


async def test_a_late_let_through_finalize_adjusts_and_labels_the_expiry(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """A request whose hold expired while Beam was unreachable was settled by the reaper
    (an expiry); its let-through Finalize adjusts the charge as any late Finalize does (ADR
    0009) and labels the request, its expiry's event and its adjustment's: who settled it
    first does not decide whether it counts as let through."""
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await _customer(runtime, p, "c1", 100_000, hold_ttl_seconds=60)
    await _expire(runtime, p, "c1", ["e1"], 1_000)  # 2 000 grains
    late = await runtime.ledger.finalize(p, FinalizeCommand(
        "c1", "e1", "COMPLETED_SUCCESS", total_actual_cost_grains=2_600, let_through=True,
    ))  # fmt: skip
    assert late.charged_grains == 2_600
    assert await _request_and_event(stores, tenant.name, "c1", "e1") == (True, True)
    rows = (await Usage(runtime.postgres).customer_usage(p, UsageQuery("c1", bucket="day"))).rows
    assert _sums(rows) == (1, 2_600, 1, 2_600)
    # The same Finalize again (a retry): the same answer, nothing charged or counted twice.
    again = await runtime.ledger.finalize(p, FinalizeCommand(
        "c1", "e1", "COMPLETED_SUCCESS", total_actual_cost_grains=2_600, let_through=True,
    ))  # fmt: skip
    assert (again.charged_grains, again.replayed) == (2_600, True)
    rows = (await Usage(runtime.postgres).customer_usage(p, UsageQuery("c1", bucket="day"))).rows
    assert _sums(rows) == (1, 2_600, 1, 2_600)


# -- migration 0008 ----------------------------------------------------------------------


def _files(tmp_path: Path, last: str) -> Path:
    directory = tmp_path / last
    directory.mkdir()
    for path in migration_files():
        if path.stem <= last:
            shutil.copy(path, directory)
    return directory


_MONEY = {
    "customers": "SELECT * FROM customers ORDER BY tenant, customer_id",
    "transactions": "SELECT * FROM transactions ORDER BY id",
    "requests": """SELECT tenant, customer_id, request_id, status, model, estimated_cost_grains,
                          reserved_grains, consumed_grains, actual_cost_grains, refunded_grains,
                          overage_grains, prompt_tokens, completion_tokens,
                          cached_prompt_tokens, balance_after_grains, balance_version,
                          created_at, completed_at, hold_nonce
                   FROM requests ORDER BY request_id""",
    "usage_events": """SELECT time, tenant, customer_id, request_id, model, status,
                              prompt_tokens, completion_tokens, cached_prompt_tokens,
                              cost_grains, request_count, entry_type, transaction_id
                       FROM usage_events ORDER BY transaction_id""",
}


async def _money(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r) for r in await conn.fetch(q)] for name, q in _MONEY.items()}


async def _settle(conn: asyncpg.Connection, *items: dict[str, Any]) -> list[dict[str, Any]]:
    answer = json.loads(await conn.fetchval("SELECT beam_settle($1::jsonb)", json.dumps(
        [{**item, "i": i} for i, item in enumerate(items)])))  # fmt: skip
    assert all("error" not in a for a in answer), answer
    return sorted(answer, key=lambda a: int(a["i"]))


async def test_migration_0008_on_a_database_with_history(stores: Stores, tmp_path: Path) -> None:
    dsn = await _fresh_database(stores)
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        assert (await migrate(conn, _files(tmp_path, "0007_claim_second_hold")))[-1] == (
            "0007_claim_second_hold"
        )
        await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
        await _append(conn, "credit:1", "credit", 1_000_000, "", datetime.now(UTC))
        # History: settlements by a process that sends no label, an adjustment.
        await _settle(conn, _settlement("r1", "completed", 700, "gpt-4", cached=5),
                      _settlement("r2", "expired", 2_000, "cheap"))  # fmt: skip
        await _append(conn, "adjustment:c:r2", "adjustment", -700, "r2",
                      datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        before = await _money(conn)

        assert await migrate(conn) == [MIGRATION]
        # Old rows: unlabelled, and nothing else changed.
        assert await _money(conn) == before
        assert await conn.fetch("SELECT request_id, let_through FROM requests ORDER BY 1") == [
            ("r1", False), ("r2", False),
        ]  # fmt: skip
        assert await conn.fetchval("SELECT bool_or(let_through) FROM usage_events") is False
        # Idempotent: the file again changes nothing.
        await conn.execute((migration_files()[-1]).read_text())
        assert await _money(conn) == before
        assert await migrate(conn) == []

        # New settlements: labelled, unlabelled (false, or no key: an older process).
        unlabelled = _settlement("r4", "completed", 300, "cheap")
        del unlabelled["let_through"]
        answers = await _settle(
            conn,
            _settlement("r3", "completed", 900, "cheap", let_through=True),
            unlabelled,
            _settlement("r5", "killed", 50, "cheap", let_through=False),
        )
        assert [(a["outcome"], a["row"]["let_through"], a["row"]["balance_after_grains"])
                for a in answers] == [
            ("new", True, 1_000_000 - 3_400 - 900),
            ("new", False, 1_000_000 - 3_400 - 1_200),
            ("new", False, 1_000_000 - 3_400 - 1_250),
        ]  # fmt: skip
        # A replay answers the stored row (its label too), whatever it says; writes nothing.
        after = await _money(conn)
        (replay,) = await _settle(conn, _settlement("r3", "completed", 900, "cheap"))
        assert (replay["outcome"], replay["row"]["let_through"]) == ("replay", True)
        assert await _money(conn) == after
        assert await conn.fetch(
            """SELECT transaction_id, let_through FROM usage_events
               WHERE request_id IN ('r3', 'r4', 'r5') ORDER BY 1"""
        ) == [("settlement:c:r3", True), ("settlement:c:r4", False),
              ("settlement:c:r5", False)]  # fmt: skip
        assert await conn.fetchrow(
            """SELECT current_balance_grains, balance_version, lifetime_spent_grains
               FROM customers"""
        ) == (1_000_000 - 4_650, 7, 3_950)  # the adjustment above was written by hand

        # Usage analytics (plain PostgreSQL: usage_events).
        store = UsageStore(pool)
        now = datetime.now(UTC)
        day = datetime(now.year, now.month, now.day, tzinfo=UTC)
        rows = await store.customer_usage("t", "c", day - timedelta(days=2),
                                          day + timedelta(days=1), Bucket.DAY,
                                          by_model=True, limit=100)  # fmt: skip
        assert [(r.start, r.model, r.requests, r.charged_grains, r.let_through_requests,
                 r.let_through_grains) for r in rows] == sorted([
            (day - timedelta(days=1), "cheap", 0, 700, 0, 0),
            (day, "cheap", 4, 2_000 + 900 + 300 + 50, 1, 900),
            (day, "gpt-4", 1, 700, 0, 0),
        ])  # fmt: skip
        (spend,) = await store.top_customers("t", day - timedelta(days=2),
                                             day + timedelta(days=1), limit=5)  # fmt: skip
        assert (spend.requests, spend.charged_grains, spend.let_through_requests,
                spend.let_through_grains) == (5, 4_650, 1, 900)  # fmt: skip

        # A restore that left usage_events out: the backfill rebuilds the labels too.
        events = await conn.fetch("SELECT * FROM usage_events ORDER BY transaction_id")
        await conn.execute("DELETE FROM usage_events")
        assert await conn.fetchval("SELECT beam_usage_backfill()") == len(events) == 6
        rebuilt = await conn.fetch("SELECT * FROM usage_events ORDER BY transaction_id")
        assert [tuple(r) for r in rebuilt] == [tuple(r) for r in events]
    finally:
        await pool.close()
        await conn.close()


# 0008's TimescaleDB step, where TimescaleDB is missing: stand-ins answer its two questions
# (is the extension there? is usage_events a hypertable?) so that the step runs, and
# time_bucket; a plain materialized view stands in for 0005's aggregate. Creating the new
# aggregate then fails (no timescaledb options here), after its query was analysed.
_STAND_INS = """
CREATE SCHEMA shim;
CREATE VIEW shim.pg_extension AS SELECT 'timescaledb'::name AS extname;
CREATE FUNCTION shim.time_bucket(INTERVAL, TIMESTAMPTZ) RETURNS TIMESTAMPTZ
    LANGUAGE sql IMMUTABLE AS $$ SELECT date_bin($1, $2, TIMESTAMPTZ '2000-01-03') $$;
CREATE SCHEMA timescaledb_information;
CREATE VIEW timescaledb_information.hypertables AS
    SELECT 'usage_events'::name AS hypertable_name, current_schema() AS hypertable_schema;
CREATE MATERIALIZED VIEW public.usage_hourly AS SELECT 1 AS requests;
INSERT INTO beam_state (name, value) VALUES ('usage_hourly', 'complete');
"""


def _timescale_step() -> str:
    path = migration_files()[-1]
    assert path.stem == MIGRATION
    sql = path.read_text()
    return sql[sql.index("DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_extension") :]


@pytest.mark.parametrize("history", [False, True])
async def test_0008_takes_the_aggregate_and_its_completeness_back(
    stores: Stores, history: bool
) -> None:
    dsn = await _fresh_database(stores)
    conn = await asyncpg.connect(dsn)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await migrate(conn)
        if history:
            await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
            await _append(conn, "credit:1", "credit", 1_000, "", datetime.now(UTC))
            await _settle(conn, _settlement("r1", "completed", 700, "gpt-4"))
        await conn.execute(_STAND_INS)
        await conn.execute("SET search_path = shim, pg_catalog, public")
        await conn.execute(_timescale_step())
        await conn.execute("RESET search_path")
        # The old aggregate is gone and not complete; the new one could not be created here,
        # so reads use usage_events (UsageStore.aggregate_usable is False).
        assert await conn.fetchval("SELECT to_regclass('public.usage_hourly')") is None
        state = "SELECT count(*) FROM beam_state WHERE name = 'usage_hourly'"
        assert await conn.fetchval(state) == 0
        (warning,) = [n for n in notices if "usage_hourly" in n]
        assert warning.startswith("usage_hourly not created (unrecognized parameter "
                                  'namespace "timescaledb")'), notices  # fmt: skip
    finally:
        await conn.close()
