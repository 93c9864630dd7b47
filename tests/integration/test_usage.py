"""Usage analytics on real PostgreSQL: every bucket's spend is the ledger's, to the grain.

A mixed workload (settlements on three models with cached tokens, a zero-charge failure,
expiries settled by the reaper, late-Finalize adjustments up and down, a second hold charged
under a settled request id, credits and debits that are not spend, and a second customer)
is bucketed by minute, hour and day, by model or not, and each bucket is compared with the
ledger's settlement, expiry and adjustment entries of the same period and customer.
Migration 0005 is also applied to a database that already has history (legacy events,
adjustments without events) and must make that history add up too.
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
from beam.adapters.usage_store import Bucket, UsagePolicies, UsageStore
from beam.constants import done_key
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.core.usage import (
    BUCKET_WIDTHS,
    TopCustomersQuery,
    Usage,
    UsageQuery,
)
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from tests.support.stack import Stores, Tenant, fresh_database

SPEND = ("settlement", "expiry", "adjustment")


async def _customer(rt: Runtime, p: Principal, cid: str, balance: int, **config: Any) -> None:
    await rt.admin.create_customer(p, Customer(p.tenant, cid, cid), balance)
    if config:
        stored, _ = await rt.postgres.upsert_customer(Customer(p.tenant, cid, cid, **config))
        await rt.ledger.load_account(stored)


async def _settle(rt: Runtime, p: Principal, cid: str, rid: str, model: str,
                  usage: tuple[int, int, int], cost: int = 0) -> int:  # fmt: skip
    check = await rt.ledger.check(p, CheckCommand(cid, rid, 50_000, 1.0, model))
    prompt, completion, cached = usage
    result = await rt.ledger.finalize(p, FinalizeCommand(
        cid, rid, "COMPLETED_SUCCESS", prompt, completion, cached, cost, model,
        check.request_token,
    ))  # fmt: skip
    return result.charged_grains


async def _expire(rt: Runtime, p: Principal, cid: str, rids: list[str], tokens: int) -> None:
    """Open a hold per id, stream ``tokens`` completion tokens of "cheap" on each, let the
    holds expire (the clock moves past their TTL) and let the reaper settle them."""
    for rid in rids:
        check = await rt.ledger.check(p, CheckCommand(cid, rid, 10_000, 1.0, "cheap"))
        await rt.ledger.deduct(p, DeductCommand(cid, rid, check.request_token, tokens, "",
                                                True, 1))  # fmt: skip
    faults.advance(61_000)
    await rt.ledger.balance(p, cid)  # expires them (moves them to the expiring set)
    for _ in range(50):  # bounded: this reaper, or a `beam serve`'s on the same stores
        await rt.reaper.run_once()
        found = [await rt.postgres.find_settlement(p.tenant, cid, rid) for rid in rids]
        if all(s is not None for s in found):
            break
    assert [s.status.value if s else None for s in found] == ["expired"] * len(rids)


async def _second_hold(rt: Runtime, p: Principal, cid: str, rid: str) -> None:
    """A second hold under a settled id (its Check could not ask the ledger) streams 400
    tokens of "cheap": charged on its own, as `settlement:<c>:<r>#<nonce>`."""
    await rt.redis.client.delete(done_key(p.tenant, cid, rid))
    faults.set_bugs({faults.BUG_FREE_REUSE})
    again = await rt.ledger.check(p, CheckCommand(cid, rid, 1_000, 1.0, "cheap"))
    faults.set_bugs(set())
    await rt.ledger.deduct(p, DeductCommand(cid, rid, again.request_token, 400, "cheap", True, 1))
    with pytest.raises(BeamError) as conflict:
        await rt.ledger.finalize(p, FinalizeCommand(
            cid, rid, "COMPLETED_SUCCESS", actual_completion_tokens=400,
            request_token=again.request_token,
        ))  # fmt: skip
    assert conflict.value.reason is Reason.REQUEST_ID_CONFLICT


async def mixed_workload(rt: Runtime, tenant: Tenant) -> Principal:
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await _customer(rt, p, "c1", 10_000_000, hold_ttl_seconds=60)
    await _customer(rt, p, "c2", 10_000_000)
    await _settle(rt, p, "c1", "s1", "gpt-4", (234, 487, 0), cost=48_700)
    await _settle(rt, p, "c1", "s2", "gpt-4o-mini", (10_000, 2_000, 4_000))
    await _settle(rt, p, "c1", "s3", "cheap", (1_000, 1_000, 0))
    await _settle(rt, p, "c2", "s1", "gpt-4", (100, 100, 0))
    # A failure with no usage: a settled request that costs nothing.
    await rt.ledger.check(p, CheckCommand("c1", "f1", 1_000, 1.0, "cheap"))
    await rt.ledger.finalize(p, FinalizeCommand("c1", "f1", "FAILED_ERROR"))
    await _expire(rt, p, "c1", ["e1", "e2", "e3"], 1_000)  # 2 000 grains each
    # Late Finalizes: the provider's usage wins by one adjustment each (up, down, none).
    late = [("e1", 2_700), ("e2", 1_200)]
    for rid, cost in late:
        result = await rt.ledger.finalize(p, FinalizeCommand(
            "c1", rid, "COMPLETED_SUCCESS", total_actual_cost_grains=cost))  # fmt: skip
        assert result.charged_grains == cost
    await rt.ledger.finalize(p, FinalizeCommand("c1", "e3", "FAILED_ERROR"))  # keeps 2 000
    await _second_hold(rt, p, "c1", "s3")
    # Not spend: a credit and a debit.
    await rt.admin.credit(p, LedgerCommand("c1", 5_000, "top-up", "inv-1"))
    await rt.admin.debit(p, LedgerCommand("c1", 3_000, "fee", "fee-1"))
    return p


async def _ledger(stores: Stores, tenant: str, customer_id: str) -> list[asyncpg.Record]:
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        return await conn.fetch(  # type: ignore[no-any-return]
            """SELECT t.transaction_id, t.transaction_type, t.amount_grains, t.created_at,
                      COALESCE(r.model, '') AS model
               FROM transactions t LEFT JOIN requests r
                 ON r.tenant = t.tenant AND r.customer_id = t.customer_id
                AND r.request_id = t.reference_id
               WHERE t.tenant = $1 AND t.customer_id = $2
                 AND t.transaction_type = ANY($3::text[])
               ORDER BY t.id""",
            tenant,
            customer_id,
            list(SPEND),
        )
    finally:
        await conn.close()


def _expected(entries: list[asyncpg.Record], bucket: Bucket, by_model: bool) -> dict[Any, int]:
    """The ledger's spend per (bucket start, model), bucketed in UTC."""
    width = BUCKET_WIDTHS[bucket]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    sums: dict[Any, int] = {}
    for e in entries:
        start = epoch + (e["created_at"] - epoch) // width * width
        key = (start, e["model"] if by_model else "")
        sums[key] = sums.get(key, 0) - e["amount_grains"]
    return sums


async def test_every_bucket_sums_to_the_ledger_after_a_mixed_workload(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await mixed_workload(runtime, tenant)
    entries = await _ledger(stores, tenant.name, "c1")
    kinds = sorted({(e["transaction_type"], "#" in e["transaction_id"]) for e in entries})
    assert kinds == [("adjustment", False), ("expiry", False), ("settlement", False),
                     ("settlement", True)]  # fmt: skip
    total = -sum(e["amount_grains"] for e in entries)
    # s1 48 700 + s2 2 400 + s3 3 000 + f1 0 + 3 x 2 000 expired + 700 - 800 adjusted
    # + 800 (the second hold under s3).
    assert total == 60_800
    usage = Usage(runtime.postgres)
    start = (min(e["created_at"] for e in entries) - timedelta(minutes=5)).isoformat()
    end = (max(e["created_at"] for e in entries) + timedelta(minutes=5)).isoformat()
    requests = await runtime.admin.list_requests(p, "c1", 100)
    for bucket in Bucket:
        for by_model in (False, True):
            query = UsageQuery("c1", start, end, bucket.value, "model" if by_model else "")
            report = await usage.customer_usage(p, query)
            got = {(r.start, r.model): r.charged_grains for r in report.rows}
            assert got == _expected(entries, bucket, by_model), (bucket, by_model)
            assert sum(got.values()) == total
            rows = report.rows
            assert sum(r.requests for r in rows) == len(requests) == 7
            assert sum(r.prompt_tokens for r in rows) == sum(s.prompt_tokens for s in requests)
            assert sum(r.completion_tokens for r in rows) == sum(
                s.completion_tokens for s in requests
            )
            assert sum(r.cached_prompt_tokens for r in rows) == 4_000
            assert [(r.start, r.model) for r in rows] == sorted((r.start, r.model) for r in rows)
    # One usage event per spending ledger entry, at the entry's time, for the entry's amount.
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        pairs = await conn.fetch(
            """SELECT t.transaction_id, t.created_at = u.time AS same_time,
                      -t.amount_grains = u.cost_grains AS same_amount
               FROM transactions t
               FULL JOIN usage_events u
                 ON u.tenant = t.tenant AND u.transaction_id = t.transaction_id
               WHERE (t.tenant = $1 AND t.transaction_type = ANY($2::text[]))
                  OR u.tenant = $1""",
            tenant.name,
            list(SPEND),
        )
    finally:
        await conn.close()
    assert len(pairs) == len(entries) + 1  # c2's settlement
    assert all(r["same_time"] and r["same_amount"] for r in pairs), pairs
    report = await runtime.admin.verify_integrity(p)
    assert [r.problems for r in report] == [[], []]


async def test_top_customers_and_the_24h_spend_are_the_ledger_too(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await mixed_workload(runtime, tenant)
    c1 = -sum(e["amount_grains"] for e in await _ledger(stores, tenant.name, "c1"))
    c2 = -sum(e["amount_grains"] for e in await _ledger(stores, tenant.name, "c2"))
    usage = Usage(runtime.postgres)
    top = await usage.top_customers(p, TopCustomersQuery())
    assert [(c.customer_id, c.charged_grains) for c in top.customers] == [("c1", c1), ("c2", c2)]
    assert (top.end - top.start) == timedelta(days=30, hours=1)
    one = await usage.top_customers(p, TopCustomersQuery(limit=1))
    assert [c.customer_id for c in one.customers] == ["c1"]
    # A key limited to c2 sees c2 only (filtered before the limit).
    only_c2 = Principal(tenant.name, Role.READER, "r", frozenset({"c2"}))
    seen = await usage.top_customers(only_c2, TopCustomersQuery(limit=1))
    assert [c.customer_id for c in seen.customers] == ["c2"]
    # The BeamCustomer's status: spend over the last 24 hours.
    status = await runtime.reconciler.customer_status(tenant.name, "c1", {})
    assert status.spent_last_24h_grains == c1
    spec = {"customerId": "c3", "credits": [{"id": "welcome", "amountGrains": 1_000}]}
    fresh = await runtime.reconciler.reconcile_customer(tenant.name, spec, "BeamCustomer/c3")
    assert fresh.spent_last_24h_grains == 0


async def test_empty_periods_answer_empty(runtime: Runtime, tenant: Tenant) -> None:
    p = Principal(tenant.name, Role.READER, "r", frozenset())
    admin = Principal(tenant.name, Role.ADMIN, "a", frozenset())
    await _customer(runtime, admin, "quiet", 1_000)
    usage = Usage(runtime.postgres)
    for bucket in ("minute", "hour", "day"):
        report = await usage.customer_usage(p, UsageQuery("quiet", bucket=bucket))
        assert report.rows == []
    await _settle(runtime, admin, "quiet", "r1", "cheap", (10, 10, 0))
    long_ago = UsageQuery("quiet", "2001-01-01T00:00:00Z", "2001-01-02T00:00:00Z", "hour")
    assert (await usage.customer_usage(p, long_ago)).rows == []
    now = await usage.customer_usage(p, UsageQuery("quiet", bucket="minute"))
    assert [(r.requests, r.charged_grains) for r in now.rows] == [(1, 30)]
    top = await usage.top_customers(p, TopCustomersQuery("2001-01-01T00:00:00Z", "1000000000000"))
    assert top.customers == []


async def test_another_tenants_customer_is_not_found(runtime: Runtime, tenant: Tenant) -> None:
    admin = Principal(tenant.name, Role.ADMIN, "a", frozenset())
    await _customer(runtime, admin, "mine", 1_000)
    usage = Usage(runtime.postgres)
    for principal, customer_id in (
        (Principal("another-tenant", Role.ADMIN, "x", frozenset()), "mine"),
        (Principal(tenant.name, Role.READER, "r", frozenset({"other"})), "mine"),
        (admin, "nobody"),
    ):
        with pytest.raises(BeamError) as missing:
            await usage.customer_usage(principal, UsageQuery(customer_id))
        assert (missing.value.reason, missing.value.field) == (
            Reason.CUSTOMER_NOT_FOUND, "customer_id",
        )  # fmt: skip
        assert str(missing.value) == f"customer {customer_id!r} not found"


# -- migration 0005 on a database with history ----------------------------------------------


async def _fresh_database(stores: Stores) -> str:
    return await fresh_database(stores)


def _settlement(rid: str, status: str, charged: int, model: str, cached: int = 0,
                let_through: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "tenant": "t", "customer_id": "c", "request_id": rid, "status": status, "model": model,
        "estimated_grains": charged, "reserved_grains": charged, "consumed_grains": charged,
        "charged_grains": charged, "refunded_grains": 0, "prompt_tokens": 10,
        "completion_tokens": 20, "cached_prompt_tokens": cached, "hold_nonce": f"n-{rid}",
        "created_at_ms": None, "charge_other_hold": True, "let_through": let_through,
    }  # fmt: skip


async def _append(conn: asyncpg.Connection, txid: str, kind: str, amount: int, ref: str,
                  at: datetime) -> None:  # fmt: skip
    """An entry at a chosen time, as beam_append_entry writes it (balance and version)."""
    before, version = await conn.fetchrow(
        "SELECT current_balance_grains, balance_version FROM customers WHERE customer_id = 'c'"
    )
    await conn.execute(
        """UPDATE customers SET current_balance_grains = $1, balance_version = $2
           WHERE customer_id = 'c'""",
        before + amount,
        version + 1,
    )
    await conn.execute(
        """INSERT INTO transactions (tenant, customer_id, transaction_id, transaction_type,
               amount_grains, balance_after_grains, balance_version, reference_id, created_at)
           VALUES ('t', 'c', $1, $2, $3, $4, $5, $6, $7)""",
        txid, kind, amount, before + amount, version + 1, ref, at,
    )  # fmt: skip


async def test_migration_0005_makes_existing_history_add_up(stores: Stores, tmp_path: Path) -> None:
    dsn = await _fresh_database(stores)
    before = tmp_path / "0004"
    before.mkdir()
    for path in migration_files():
        if path.stem <= "0004_settle_batch":
            shutil.copy(path, before)
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        assert "0005_usage_analytics" not in await migrate(conn, before)
        await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
        await _append(conn, "credit:1", "credit", 1_000_000, "", datetime.now(UTC))
        await conn.fetchval("SELECT beam_settle($1::jsonb)", json.dumps([
            _settlement("r1", "completed", 700, "gpt-4", cached=5),
            _settlement("r2", "expired", 2_000, "cheap"),
        ]))  # fmt: skip
        # History from before 0005: adjustments and a second hold's charge had no event.
        two_days_ago = datetime.now(UTC) - timedelta(days=2, minutes=3)
        await _append(conn, "adjustment:c:r2", "adjustment", -700, "r2", two_days_ago)
        await _append(conn, "settlement:c:r1#n-x", "settlement", -800, "r1",
                      two_days_ago - timedelta(hours=5))  # fmt: skip
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 2
        # 0005, then the later migrations the current UsageStore reads (0008's let_through).
        assert (await migrate(conn))[0] == "0005_usage_analytics"
        # After 0005, new entries get their events as they are written.
        await _append(conn, "adjustment:c:r1", "adjustment", 300, "r1",
                      datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        entries = await conn.fetch(
            """SELECT t.transaction_id, t.transaction_type, t.amount_grains, t.created_at,
                      COALESCE(r.model, '') AS model
               FROM transactions t LEFT JOIN requests r
                 ON r.tenant = t.tenant AND r.customer_id = t.customer_id
                AND r.request_id = t.reference_id
               WHERE t.transaction_type = ANY($1::text[])""",
            list(SPEND),
        )
        assert len(entries) == 5
        store = UsageStore(pool)
        start = datetime.now(UTC) - timedelta(days=10)
        for bucket in Bucket:
            width = BUCKET_WIDTHS[bucket]
            lo = datetime(1970, 1, 1, tzinfo=UTC) + (start - datetime(1970, 1, 1, tzinfo=UTC)) \
                // width * width  # fmt: skip
            if bucket is Bucket.MINUTE:  # a day of minutes at most: the recent ones
                lo = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
            hi = datetime.now(UTC) + timedelta(days=1)
            hi = datetime(1970, 1, 1, tzinfo=UTC) + (hi - datetime(1970, 1, 1, tzinfo=UTC)) \
                // width * width  # fmt: skip
            rows = await store.customer_usage("t", "c", lo, hi, bucket, by_model=True, limit=100)
            expected = {
                k: v for k, v in _expected(list(entries), bucket, True).items() if lo <= k[0] < hi
            }
            assert {(r.start, r.model): r.charged_grains for r in rows} == expected, bucket
        events = await conn.fetch(
            """SELECT transaction_id, entry_type, request_count, cached_prompt_tokens, model
               FROM usage_events ORDER BY transaction_id"""
        )
        assert [tuple(e) for e in events] == [
            ("adjustment:c:r1", "adjustment", 0, 0, "gpt-4"),
            ("adjustment:c:r2", "adjustment", 0, 0, "cheap"),
            ("expiry:c:r2", "expiry", 1, 0, "cheap"),
            ("settlement:c:r1", "settlement", 1, 5, "gpt-4"),
            ("settlement:c:r1#n-x", "settlement", 0, 0, "gpt-4"),
        ]
        # A restore that left usage_events out: beam_usage_backfill() rebuilds it.
        before_loss = await conn.fetch("SELECT * FROM usage_events ORDER BY transaction_id")
        await conn.execute("DELETE FROM usage_events")
        recent = datetime.now(UTC) - timedelta(hours=1)
        assert await conn.fetchval("SELECT beam_usage_backfill($1)", recent) == 2
        assert await conn.fetchval("SELECT beam_usage_backfill()") == 3
        assert await conn.fetchval("SELECT beam_usage_backfill()") == 0
        rebuilt = await conn.fetch("SELECT * FROM usage_events ORDER BY transaction_id")
        assert [tuple(r) for r in rebuilt] == [tuple(r) for r in before_loss]
        # Plain PostgreSQL: no TimescaleDB policy to set.
        assert await store.timescale() is False
        assert await store.apply_policies(UsagePolicies(raw_retention_days=30)) == []
    finally:
        await pool.close()
        await conn.close()
