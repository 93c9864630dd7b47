"""Migrations on a real PostgreSQL: ordered, recorded, idempotent; the ledger is append-only."""

from __future__ import annotations

import secrets
from pathlib import Path

import asyncpg
import pytest

from beam.adapters.migrations import EARLIER_CHECKSUMS, MigrationError, migrate, migration_files
from tests.support.stack import Stores

TABLES = {"customers", "transactions", "requests", "api_keys", "model_prices", "usage_events"}


async def _fresh_database(stores: Stores) -> asyncpg.Connection:
    assert stores.postgres is not None
    admin = await asyncpg.connect(stores.postgres.dsn)
    name = f"m_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return await asyncpg.connect(stores.postgres.dsn.rsplit("/", 1)[0] + f"/{name}")


async def test_migrations_apply_once_and_twice_is_a_no_op(stores: Stores) -> None:
    conn = await _fresh_database(stores)
    try:
        expected = [p.stem for p in migration_files()]
        assert await migrate(conn) == expected
        assert await migrate(conn) == []
        recorded = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == expected
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert tables >= TABLES
        # usage_events is a hypertable exactly when TimescaleDB is preloaded (never when it
        # is installed but not preloaded: 0001 checks before CREATE EXTENSION).
        preloaded = await conn.fetchval(
            "SELECT 'timescaledb' = ANY(string_to_array("
            "replace(current_setting('shared_preload_libraries'), ' ', ''), ','))"
        )
        has_timescale = await conn.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
        assert has_timescale == (1 if preloaded else 0)
    finally:
        await conn.close()


async def test_a_changed_migration_is_refused(stores: Stores, tmp_path: Path) -> None:
    conn = await _fresh_database(stores)
    try:
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x int);")
        assert await migrate(conn, tmp_path) == ["0001_first"]
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x bigint);")
        with pytest.raises(MigrationError, match="0001_first changed"):
            await migrate(conn, tmp_path)
    finally:
        await conn.close()


# 0001's TimescaleDB step, run alone on a fresh database. The test PostgreSQL has no
# TimescaleDB, so a schema "shim" placed before pg_catalog in search_path answers the two
# questions the step asks (is it installed? is it preloaded?), and an event trigger reports
# every CREATE EXTENSION the step attempts (then fails it, as a missing extension would).
_SHIM = """
CREATE SCHEMA shim;
CREATE VIEW shim.pg_available_extensions AS SELECT 'timescaledb'::name AS name;
CREATE FUNCTION shim.report_create_extension() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'attempted: %', tg_tag;
    RAISE EXCEPTION 'no such extension here';
END $$;
CREATE EVENT TRIGGER report_create_extension ON ddl_command_start
    WHEN TAG IN ('CREATE EXTENSION') EXECUTE FUNCTION shim.report_create_extension();
CREATE TABLE usage_events (time timestamptz NOT NULL);
"""


def _timescale_step() -> str:
    sql = migration_files()[0].read_text()
    assert migration_files()[0].stem == "0001_ledger"
    return sql[
        sql.index("DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions") :
    ]


@pytest.mark.parametrize(
    ("preloaded", "attempted"),
    [
        (None, False),  # the server's own setting: nothing preloaded here
        ("", False),
        ("pg_stat_statements", False),
        ("timescaledb_toolkit", False),
        ("timescaledb", True),
        ("pg_stat_statements, timescaledb", True),
        ('"$libdir/timescaledb"', True),
    ],
)
async def test_timescaledb_is_created_only_when_preloaded(
    stores: Stores, preloaded: str | None, attempted: bool
) -> None:
    conn = await _fresh_database(stores)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await conn.execute(_SHIM)
        if preloaded is not None:
            await conn.execute(
                "CREATE FUNCTION shim.current_setting(text) RETURNS text LANGUAGE sql "
                f"AS $$ SELECT '{preloaded.replace(chr(39), chr(39) * 2)}'::text $$"
            )
        await conn.execute("SET search_path = shim, pg_catalog, public")
        await conn.execute(_timescale_step())
        assert ("attempted: CREATE EXTENSION" in notices) is attempted, notices
        if attempted:
            assert any("usage_events stays a plain table" in n for n in notices)
        else:
            assert notices == [
                "timescaledb is installed but not in shared_preload_libraries; "
                "usage_events stays a plain table"
            ]
    finally:
        await conn.close()


async def test_a_database_that_applied_the_earlier_0001_still_migrates(stores: Stores) -> None:
    conn = await _fresh_database(stores)
    try:
        await migrate(conn)
        (earlier,) = EARLIER_CHECKSUMS["0001_ledger"]
        await conn.execute(
            "UPDATE schema_migrations SET checksum = $1 WHERE version = '0001_ledger'", earlier
        )
        assert await migrate(conn) == []
        await conn.execute(
            "UPDATE schema_migrations SET checksum = 'other' WHERE version = '0001_ledger'"
        )
        with pytest.raises(MigrationError, match="0001_ledger changed"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_the_ledger_refuses_updates_and_deletes(stores: Stores) -> None:
    conn = await _fresh_database(stores)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
        await conn.execute(
            """INSERT INTO transactions (tenant, customer_id, transaction_id, transaction_type,
                   amount_grains, balance_after_grains, balance_version)
               VALUES ('t', 'c', 'tx', 'credit', 5, 5, 1)"""
        )
        for statement in (
            "UPDATE transactions SET amount_grains = 6",
            "DELETE FROM transactions",
            "TRUNCATE transactions CASCADE",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT sum(amount_grains) FROM transactions") == 5
    finally:
        await conn.close()
