"""Usage analytics on TimescaleDB: the hourly continuous aggregate and the policies.

Runs where TimescaleDB is installed for the test PostgreSQL (a dedicated server is started
with ``shared_preload_libraries = 'timescaledb'``), or against ``BEAM_TEST_TIMESCALE_DSN``
(a TimescaleDB server whose user may create databases). Elsewhere every test here skips,
saying why; the same answers on plain PostgreSQL are proven by test_usage.py.

Checked: migration 0005 creates ``usage_hourly`` (real-time) with its refresh policy; hour
and day buckets and the top customers come from it once it is complete and still equal the
ledger bucket by bucket, before and after a refresh; a database with history is read from
the hypertable until ``apply_policies`` has materialized that history; the retention and
compression policies follow the settings and re-applying them is idempotent; every policy
job runs (``run_job``) and succeeds. Policy jobs are told from TimescaleDB's built-in ones
(telemetry, job-stat history) by their hypertable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from beam.adapters.migrations import migrate, migration_files
from beam.adapters.usage_store import Bucket, UsagePolicies, UsageStore
from beam.core.usage import BUCKET_WIDTHS, floor_to
from beam_dev import servers as devservers
from tests.integration.test_usage import SPEND, _append, _expected, _settlement
from tests.support.stack import Stores

NOT_INSTALLED = (
    "TimescaleDB is not installed for the test PostgreSQL (no timescaledb in "
    "pg_available_extensions) and BEAM_TEST_TIMESCALE_DSN is unset: the continuous aggregate "
    "and its policies are exercised where it is; plain PostgreSQL is covered by test_usage.py"
)


@pytest.fixture(scope="module")
def timescale_server(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN of a TimescaleDB server (its maintenance database), or a skip with the reason."""
    external = os.environ.get("BEAM_TEST_TIMESCALE_DSN")
    if external:
        yield external
        return
    assert stores.postgres is not None
    available = stores.postgres.psql(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).strip()
    if available == "0":
        pytest.skip(NOT_INSTALLED)
    # Preloaded from the command line: ALTER SYSTEM cannot name timescaledb.* settings before
    # the library is loaded (PostgreSQL 15 refuses them as unknown).
    server = devservers.PostgresServer(
        tmp_path_factory.mktemp("timescale") / "postgres",
        bin_dir=stores.postgres.bin_dir,
        preload_libraries=("timescaledb",),
        extra_settings={"timescaledb.telemetry_level": "off"},
    )
    server.start()
    try:
        yield server.dsn
    finally:
        server.stop()


async def _database(server_dsn: str) -> str:
    conn = await asyncpg.connect(server_dsn)
    name = f"ts_{secrets.token_hex(4)}"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
async def fresh(timescale_server: str) -> AsyncIterator[tuple[asyncpg.Connection, UsageStore]]:
    dsn = await _database(timescale_server)
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        yield conn, UsageStore(pool)
    finally:
        await pool.close()
        await conn.close()


async def _require_hypertable(conn: asyncpg.Connection) -> None:
    loaded = await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname='timescaledb'")
    if not loaded:
        pytest.skip("timescaledb is installed but could not be loaded (shared_preload_libraries)")


# Beam's own policy jobs: TimescaleDB's built-in jobs (policy_telemetry,
# policy_job_stat_history_retention, ...) belong to no hypertable.
_OWN_JOBS = """SELECT job_id, proc_name, hypertable_name, config
               FROM timescaledb_information.jobs
               WHERE proc_name LIKE 'policy_%' AND hypertable_name IS NOT NULL
               ORDER BY proc_name"""


async def _run_jobs(conn: asyncpg.Connection, jobs: list[asyncpg.Record]) -> dict[str, str]:
    """Run each job now (run_job, outside a transaction); proc_name -> its last run status."""
    for job in jobs:
        await conn.execute(f"CALL run_job({int(job['job_id'])})")
    rows = await conn.fetch(
        """SELECT j.proc_name, s.last_run_status
           FROM timescaledb_information.job_stats s
           JOIN timescaledb_information.jobs j USING (job_id)
           WHERE s.job_id = ANY($1::int[])""",
        [job["job_id"] for job in jobs],
    )
    return {row["proc_name"]: row["last_run_status"] for row in rows}


async def _workload(conn: asyncpg.Connection) -> None:
    """Settlements now, adjustments and a second hold's charge at chosen past times."""
    await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
    await _append(conn, "credit:1", "credit", 1_000_000, "", datetime.now(UTC))
    await conn.fetchval("SELECT beam_settle($1::jsonb)", json.dumps([
        _settlement("r1", "completed", 700, "gpt-4", cached=5, let_through=True),
        _settlement("r2", "expired", 2_000, "cheap"),
    ]))  # fmt: skip
    now = datetime.now(UTC)
    await _append(conn, "adjustment:c:r2", "adjustment", -700, "r2", now - timedelta(days=2))
    await _append(conn, "settlement:c:r1#n-x", "settlement", -800, "r1",
                  now - timedelta(days=9, hours=5))  # fmt: skip


async def _assert_equals_ledger(conn: asyncpg.Connection, store: UsageStore) -> None:
    entries = await conn.fetch(
        """SELECT t.transaction_type, t.amount_grains, t.created_at,
                  COALESCE(r.model, '') AS model
           FROM transactions t LEFT JOIN requests r
             ON r.tenant = t.tenant AND r.customer_id = t.customer_id
            AND r.request_id = t.reference_id
           WHERE t.transaction_type = ANY($1::text[])""",
        list(SPEND),
    )
    # Let through (0008; a database that settled before 0008 has none): settled just now.
    let_through = tuple(await conn.fetchrow(
        """SELECT count(*), COALESCE(sum(actual_cost_grains), 0)::bigint FROM requests
           WHERE let_through"""
    ))  # fmt: skip
    now = datetime.now(UTC)
    for bucket in Bucket:
        width = BUCKET_WIDTHS[bucket]
        span = timedelta(hours=20) if bucket is Bucket.MINUTE else timedelta(days=30)
        lo, hi = floor_to(now - span, width), floor_to(now + width, width)
        for by_model in (False, True):
            rows = await store.customer_usage("t", "c", lo, hi, bucket, by_model=by_model,
                                              limit=10_000)  # fmt: skip
            expected = {
                k: v for k, v in _expected(list(entries), bucket, by_model).items()
                if lo <= k[0] < hi
            }  # fmt: skip
            assert {(r.start, r.model): r.charged_grains for r in rows} == expected, bucket
            assert (sum(r.let_through_requests for r in rows),
                    sum(r.let_through_grains for r in rows)) == let_through, bucket  # fmt: skip
    hour = BUCKET_WIDTHS[Bucket.HOUR]
    since, until = floor_to(now - timedelta(days=30), hour), floor_to(now + hour, hour)
    top = await store.top_customers("t", since, until, limit=5)
    assert [(c.customer_id, c.charged_grains) for c in top] == [
        ("c", -sum(e["amount_grains"] for e in entries))
    ]
    assert [(c.let_through_requests, c.let_through_grains) for c in top] == [let_through]


async def test_the_hourly_aggregate_answers_like_the_ledger(
    fresh: tuple[asyncpg.Connection, UsageStore],
) -> None:
    conn, store = fresh
    await migrate(conn)
    await _require_hypertable(conn)
    assert await store.timescale() is True
    view = await conn.fetchrow(
        """SELECT materialized_only FROM timescaledb_information.continuous_aggregates
           WHERE view_name = 'usage_hourly'"""
    )
    assert view is not None
    assert view["materialized_only"] is False
    jobs = await conn.fetch(_OWN_JOBS)
    assert [j["proc_name"] for j in jobs] == ["policy_refresh_continuous_aggregate"]
    # Empty at migration time: the aggregate is complete from the start.
    assert await store.aggregate_usable() is True
    await _workload(conn)
    await _assert_equals_ledger(conn, store)  # real-time: nothing materialized yet
    await conn.execute(
        "CALL refresh_continuous_aggregate('usage_hourly', NULL::timestamptz, "
        "date_trunc('hour', now()))"
    )
    await _append(conn, "adjustment:c:r1", "adjustment", 300, "r1", datetime.now(UTC))
    await _assert_equals_ledger(conn, store)  # materialized + real-time
    # The refresh policy's own job runs and succeeds, and the answers stay the ledger's.
    assert await _run_jobs(conn, jobs) == {"policy_refresh_continuous_aggregate": "Success"}
    await _assert_equals_ledger(conn, store)


async def test_history_is_read_raw_until_materialized_then_policies_follow_settings(
    timescale_server: str, tmp_path: Path
) -> None:
    dsn = await _database(timescale_server)
    before = tmp_path / "0004"
    before.mkdir()
    for path in migration_files():
        if path.stem <= "0004_settle_batch":
            shutil.copy(path, before)
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await migrate(conn, before)
        await _require_hypertable(conn)
        await _workload(conn)
        await migrate(conn)
        store = UsageStore(pool)
        assert await store.aggregate_usable() is False  # history not materialized yet
        await _assert_equals_ledger(conn, store)  # from the hypertable
        done = await store.apply_policies(
            UsagePolicies(raw_retention_days=30, compress_after_days=7, hourly_retention_days=400)
        )
        assert done[0] == "usage_hourly: history materialized"
        assert await store.aggregate_usable() is True
        await _assert_equals_ledger(conn, store)  # from the aggregate
        for _ in range(2):  # idempotent; new values replace the old ones
            await store.apply_policies(
                UsagePolicies(raw_retention_days=60, compress_after_days=14,
                              hourly_retention_days=0)
            )  # fmt: skip
        jobs = await conn.fetch(_OWN_JOBS)
        retention = [j for j in jobs if j["proc_name"] == "policy_retention"]
        compression = [j for j in jobs if j["proc_name"] == "policy_compression"]
        # One each, on usage_events; the aggregate's retention (0 = keep) was removed.
        assert [j["hypertable_name"] for j in retention] == ["usage_events"]
        assert [j["hypertable_name"] for j in compression] == ["usage_events"]
        assert sorted(j["proc_name"] for j in jobs) == [
            "policy_compression", "policy_refresh_continuous_aggregate", "policy_retention",
        ]  # fmt: skip
        assert "60" in str(json.loads(retention[0]["config"])["drop_after"])
        # Every policy job runs now and succeeds; nothing is older than 14 days (compression)
        # or 60 days (retention), so the answers do not change.
        statuses = await _run_jobs(conn, list(jobs))
        assert statuses == {
            "policy_compression": "Success",
            "policy_refresh_continuous_aggregate": "Success",
            "policy_retention": "Success",
        }
        await _assert_equals_ledger(conn, store)
    finally:
        await pool.close()
        await conn.close()


async def test_0008_recreates_the_aggregate_and_history_is_read_raw_until_materialized(
    timescale_server: str, tmp_path: Path
) -> None:
    """A database at 0007 whose aggregate is complete and materialized: 0008 recreates it
    with the let-through sums, and reads come from the hypertable until ``apply_policies``
    has materialized the history again."""
    dsn = await _database(timescale_server)
    before = tmp_path / "0007"
    before.mkdir()
    for path in migration_files():
        if path.stem <= "0007_claim_second_hold":
            shutil.copy(path, before)
    conn = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await migrate(conn, before)
        await _require_hypertable(conn)
        await _workload(conn)  # r1's label is not recorded before 0008
        await conn.execute(
            "CALL refresh_continuous_aggregate('usage_hourly', NULL::timestamptz, "
            "date_trunc('hour', now()))"
        )
        assert await UsageStore(pool).aggregate_usable() is True  # empty at 0005: complete
        # The raw retention dropped the 9-day-old charge's event (BEAM_USAGE_RAW_RETENTION_DAYS
        # below the hourly one): only the old aggregate and the ledger still have it.
        assert (
            await conn.execute(
                "DELETE FROM usage_events WHERE transaction_id = 'settlement:c:r1#n-x'"
            )
            == "DELETE 1"
        )
        assert await migrate(conn) == ["0008_let_through"]
        assert await conn.fetchval("SELECT count(*) FROM requests WHERE let_through") == 0
        store = UsageStore(pool)
        assert await store.aggregate_usable() is False
        jobs = await conn.fetch(_OWN_JOBS)
        assert [j["proc_name"] for j in jobs] == ["policy_refresh_continuous_aggregate"]
        await conn.fetchval("SELECT beam_settle($1::jsonb)", json.dumps(
            [_settlement("r3", "completed", 900, "cheap", let_through=True)]))  # fmt: skip
        # Until apply_policies (`beam migrate`), reads come from the hypertable, which lacks
        # the dropped event: the window DATABASE.md tells operators to close.
        done = await store.apply_policies(UsagePolicies())
        # The dropped event is rebuilt from the ledger before the history is materialized.
        assert done[:2] == [
            "usage_hourly: history materialized",
            "usage_events: 1 events rebuilt from the ledger",
        ]
        assert await store.aggregate_usable() is True
        await _assert_equals_ledger(conn, store)  # from the aggregate: r3 let through
    finally:
        await pool.close()
        await conn.close()
