"""Migrations on a real PostgreSQL: ordered, recorded, idempotent; the ledger is append-only."""

from __future__ import annotations

import secrets
from pathlib import Path

import asyncpg
import pytest

from beam.adapters.migrations import MigrationError, migrate, migration_files
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
        # No TimescaleDB on this machine: usage_events stays a plain table.
        has_timescale = await conn.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
        assert has_timescale == 0
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
