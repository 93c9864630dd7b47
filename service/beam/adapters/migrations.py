"""Apply ``migrations/NNNN_name.sql`` in order, once each, under an advisory lock.

Each file runs in its own transaction and is recorded in ``schema_migrations`` with its
SHA-256; a recorded file whose content changed is refused (migrations are append-only like
the ledger: fix forward with a new file). Running ``migrate`` twice is a no-op, and two
processes migrating at once serialize on the lock.

One exception to append-only, in ``EARLIER_CHECKSUMS``: 0001 once ran ``CREATE EXTENSION
timescaledb`` whenever the extension was installed, and TimescaleDB answers that with a FATAL
(the connection dies) when it is not preloaded. Moving the step into a later file would not
do: a new database would then apply 0005 (the continuous aggregate over the hypertable)
before any file made usage_events a hypertable. So 0001 itself now checks
``shared_preload_libraries`` first, and a database that applied the earlier text (which
succeeded there, or the database would not have it recorded) keeps its record valid.

Locks: a file that waits for a table lock (behind a long reader: a ``pg_dump``, a usage
query) would make every settlement queue behind its own request for the lock. So each file
runs with ``lock_timeout`` (``LOCK_TIMEOUT``): it gives up the lock it waits for, the
transaction rolls back, and the file is tried again after a pause, up to
``LOCK_ATTEMPTS`` times; settlements run in between.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import asyncpg

from beam.adapters.resources import migrations_dir

_LOCK_ID = 0x6265616D  # "beam"
LOCK_TIMEOUT = "500ms"  # the longest a file waits for one lock before it steps back
LOCK_ATTEMPTS = 40  # then MigrationError: a reader held the tables for about three minutes
LOCK_PAUSE_SECONDS = (1.0, 5.0)  # between attempts: first, then at most

# version -> SHA-256 of earlier texts of that file which are still accepted as applied.
EARLIER_CHECKSUMS: dict[str, frozenset[str]] = {
    "0001_ledger": frozenset({"0199c2ce3e2d8c21b98b9560b30ece66071fc62ba03922554d17e43145126add"}),
}


class MigrationError(RuntimeError):
    pass


def migration_files(directory: Path | None = None) -> list[Path]:
    files = sorted((directory or migrations_dir()).glob("[0-9][0-9][0-9][0-9]_*.sql"))
    if not files:
        raise MigrationError(f"no migrations in {directory or migrations_dir()}")
    return files


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    TEXT PRIMARY KEY,
                   checksum   TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        recorded = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for path in migration_files(directory):
            version = path.stem
            sql = path.read_text()
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in recorded:
                accepted = {checksum} | EARLIER_CHECKSUMS.get(version, frozenset())
                if recorded[version] not in accepted:
                    raise MigrationError(
                        f"migration {version} changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            await _apply(conn, version, sql, checksum)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now


async def _apply(conn: asyncpg.Connection, version: str, sql: str, checksum: str) -> None:
    """One file in one transaction, stepping back from a lock it cannot get in time."""
    first, most = LOCK_PAUSE_SECONDS
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    version,
                    checksum,
                )
            return
        except asyncpg.exceptions.LockNotAvailableError as error:
            if attempt == LOCK_ATTEMPTS:
                raise MigrationError(
                    f"migration {version} could not take its locks in {LOCK_ATTEMPTS} "
                    f"attempts of {LOCK_TIMEOUT}: another session holds its tables ({error})"
                ) from error
            await asyncio.sleep(min(most, first * attempt))
