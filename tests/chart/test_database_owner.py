"""The bundled database's initdb script makes Beam a non-superuser owner, and Beam works as it.

The chart mounts `010-beam-owner.sh` into the TimescaleDB image's /docker-entrypoint-initdb.d,
which runs it once, at initdb, as the superuser "postgres". Here the rendered script runs
against a real PostgreSQL whose bootstrap superuser is "postgres" (as in the pod); then Beam
connects as the owner role it created: not a superuser, yet it applies every migration and
moves money.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from beam.adapters.migrations import migration_files
from beam_dev import servers as devservers
from tests.chart.conftest import Helm
from tests.support.stack import provision_tenant

pytestmark = pytest.mark.timeout(180)

SUPERUSER_PASSWORD = "superuser-password-0123456789"
OWNER_PASSWORD = "owner-password-0123456789"
MIGRATIONS = len(migration_files())


@pytest.fixture
def fresh_database(tmp_path: Path) -> Iterator[devservers.PostgresServer]:
    server = devservers.PostgresServer(
        tmp_path / "pg", user="postgres", password=SUPERUSER_PASSWORD, database="beam"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def init_script(helm: Helm) -> str:
    manifest = helm.template("--set", "fullnameOverride=beam")
    for doc in yaml.safe_load_all(manifest):
        if (
            doc
            and doc["kind"] == "ConfigMap"
            and doc["metadata"]["name"] == "beam-timescaledb-init"
        ):
            script: str = doc["data"]["010-beam-owner.sh"]
            return script
    raise AssertionError("no beam-timescaledb-init ConfigMap")


@pytest.fixture
def owner_dsn(helm: Helm, fresh_database: devservers.PostgresServer, tmp_path: Path) -> str:
    """Run the rendered init script as the image would; the owner role's DSN."""
    script = tmp_path / "010-beam-owner.sh"
    script.write_text(init_script(helm))
    result = subprocess.run(
        ["sh", str(script)],
        env={
            "PATH": "/usr/bin:/bin",
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "beam",
            "BEAM_DATABASE_OWNER": "beam",
            "BEAM_DATABASE_OWNER_PASSWORD": OWNER_PASSWORD,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(fresh_database.port),
            "PGPASSWORD": SUPERUSER_PASSWORD,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return f"postgresql://beam:{OWNER_PASSWORD}@127.0.0.1:{fresh_database.port}/beam"


async def test_beam_runs_as_the_non_superuser_owner_the_init_script_creates(owner_dsn: str) -> None:
    conn = await asyncpg.connect(owner_dsn)
    try:
        role = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'beam'"
        )
        assert dict(role) == {"rolsuper": False, "rolcreaterole": False, "rolcreatedb": False}
        owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'beam'"
        assert await conn.fetchval(owner) == "beam"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER SYSTEM SET work_mem = '1GB'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE ROLE intruder SUPERUSER")
    finally:
        await conn.close()

    # Every migration applies as the owner, and it writes: keys and prices of a tenant.
    tenant = await provision_tenant(owner_dsn)
    conn = await asyncpg.connect(owner_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == MIGRATIONS
        keys = "SELECT count(*) FROM api_keys WHERE tenant = $1"
        assert await conn.fetchval(keys, tenant.name) == len(tenant.keys)
    finally:
        await conn.close()
