"""The chart's scheduled integrity check finds drift, and only drift, on real stores.

The CronJob's rendered script runs as a process against a fresh PostgreSQL and Redis (not the
session's shared stores, whose other tests may leave anything behind): it exits 0 over two
tenants with funded customers, and 1 naming the customer once Redis's cached balance is
changed behind the ledger's back. Its failure is what the BeamLedgerDrift alert watches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from beam.config import Environment, RedisMode, ServiceSettings
from beam.constants import account_key
from beam.core.auth import Principal
from beam.core.runtime import Runtime
from beam.records import Customer, Role
from beam_dev import servers as devservers
from tests.chart.conftest import Helm
from tests.support.stack import TEST_TOKEN_SECRET

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fresh_stores(tmp_path: Path) -> Iterator[tuple[str, str]]:
    postgres = devservers.PostgresServer(tmp_path / "pg")
    cache = devservers.RedisServer(tmp_path / "redis")
    postgres.start()
    try:
        cache.start()
        try:
            yield postgres.dsn, cache.url
        finally:
            cache.stop()
    finally:
        postgres.stop()


def rendered_script(helm: Helm) -> str:
    manifest = helm.template("--set", "fullnameOverride=beam")
    for doc in yaml.safe_load_all(manifest):
        if doc and doc["kind"] == "CronJob" and doc["metadata"]["name"] == "beam-integrity":
            spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            assert spec["command"][:2] == ["python", "-c"]
            script: str = spec["command"][2]
            return script
    raise AssertionError("no beam-integrity CronJob")


async def _seed(dsn: str, redis_url: str) -> None:
    settings = ServiceSettings(
        environment=Environment.PRODUCTION,
        database_url=dsn,  # type: ignore[arg-type]
        redis_mode=RedisMode.STANDALONE,
        redis_url=redis_url,
        request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
        migrate_on_start=True,
        database_pool_min=1,
        database_pool_max=2,
    )
    runtime = await Runtime.create(settings, background=False)
    try:
        for tenant in ("acme", "globex"):
            admin = Principal(tenant, Role.ADMIN, "seed", frozenset())
            for index in range(3):
                customer = Customer(tenant, f"cus_{index}")
                await runtime.admin.create_customer(admin, customer, 1_000_000 * (index + 1))
    finally:
        await runtime.stop()


def _run(script: str, dsn: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        env={
            "PATH": "/usr/bin:/bin",
            "BEAM_ENVIRONMENT": "production",
            "BEAM_DATABASE_URL": dsn,
            "BEAM_REDIS_MODE": "standalone",
            "BEAM_REDIS_URL": redis_url,
            "BEAM_REQUEST_TOKEN_SECRET": TEST_TOKEN_SECRET,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_scheduled_check_passes_clean_stores_and_fails_on_drift(
    helm: Helm, fresh_stores: tuple[str, str]
) -> None:
    dsn, redis_url = fresh_stores
    script = rendered_script(helm)
    await _seed(dsn, redis_url)

    clean = _run(script, dsn, redis_url)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout.splitlines()[-1]) == {
        "tenants": 2,
        "customers": 6,
        "drifted": 0,
    }

    redis.Redis.from_url(redis_url).hset(account_key("globex", "cus_1"), "balance", 1)
    drift = _run(script, dsn, redis_url)
    assert drift.returncode == 1, drift.stderr
    lines = [json.loads(line) for line in drift.stdout.splitlines()]
    assert lines[-1] == {"tenants": 2, "customers": 6, "drifted": 1}
    assert lines[0]["tenant"] == "globex"
    assert lines[0]["customer_id"] == "cus_1"
    assert "redis balance 1" in lines[0]["problems"][0]
