"""Real stores and a real `beam serve` process for the integration and end-to-end tests.

`Stores` starts PostgreSQL plus one Redis topology (standalone, Sentinel or Cluster) from
beam_dev.servers and tests.support.topologies. `ServiceProcess` runs `beam serve` as a child
process against them, so tests talk to it over loopback exactly as an application would, and
can SIGKILL it. `Tenant` provisions a fresh tenant with keys of every role, so tests never
share money.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from beam.adapters.postgres_store import PostgresStore
from beam.config import Environment, RedisMode, ServiceSettings
from beam.core.auth import generate_key
from beam.core.pricing import parse_price_entries
from beam.records import ApiKeyRecord, Role
from beam_dev import servers as devservers
from tests.support.topologies import RedisClusterGroup, RedisSentinelGroup

TEST_TOKEN_SECRET = "test-request-token-secret-0123456789abcdef"
PRICES = [
    {"model": "gpt-4", "inputGrainsPerMillion": 30_000_000, "outputGrainsPerMillion": 60_000_000},
    {
        "model": "gpt-4o-mini",
        "inputGrainsPerMillion": 150_000,
        "outputGrainsPerMillion": 600_000,
        "cachedInputGrainsPerMillion": 75_000,
    },
    {"model": "cheap", "inputGrainsPerMillion": 1_000_000, "outputGrainsPerMillion": 2_000_000},
]


@dataclass
class Stores:
    """PostgreSQL + one Redis topology, started once per test session."""

    workdir: Path
    topology: str
    postgres: devservers.PostgresServer | None = None
    redis: Any = None

    def start(self) -> Stores:
        self.postgres = devservers.PostgresServer(self.workdir / "postgres")
        self.postgres.start()
        if self.topology == "sentinel":
            self.redis = RedisSentinelGroup(self.workdir / "sentinel")
        elif self.topology == "cluster":
            self.redis = RedisClusterGroup(self.workdir / "cluster", masters=3)
        else:
            self.redis = devservers.RedisServer(self.workdir / "redis")
        self.redis.start()
        return self

    def stop(self) -> None:
        for server in (self.redis, self.postgres):
            if server is not None:
                server.stop()

    def env(self) -> dict[str, str]:
        assert self.postgres is not None
        env = {
            "BEAM_ENVIRONMENT": "production",
            "BEAM_DATABASE_URL": self.postgres.dsn,
            "BEAM_REQUEST_TOKEN_SECRET": TEST_TOKEN_SECRET,
            "BEAM_REDIS_MODE": self.topology,
            "BEAM_MIGRATE_ON_START": "true",
        }
        if self.topology == "sentinel":
            env["BEAM_REDIS_SENTINELS"] = ",".join(
                f"{h}:{p}" for h, p in self.redis.sentinel_addresses
            )
            env["BEAM_REDIS_SENTINEL_MASTER"] = self.redis.master_name
        else:
            env["BEAM_REDIS_URL"] = self.redis.url
        return env

    def settings(self, **overrides: Any) -> ServiceSettings:
        env = self.env()
        values: dict[str, Any] = {
            "environment": Environment.PRODUCTION,
            "database_url": env["BEAM_DATABASE_URL"],
            "request_token_secret": TEST_TOKEN_SECRET,
            "redis_mode": RedisMode(self.topology),
            "redis_url": env.get("BEAM_REDIS_URL", "redis://unused:1/0"),
            "redis_sentinels": env.get("BEAM_REDIS_SENTINELS", "").split(",")
            if self.topology == "sentinel"
            else [],
            "redis_sentinel_master": env.get("BEAM_REDIS_SENTINEL_MASTER", "mymaster"),
            "migrate_on_start": True,
        }
        values.update(overrides)
        return ServiceSettings(**values)


@dataclass
class Tenant:
    """A fresh tenant: keys of each role (plaintext kept for the tests), prices seeded."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)

    def header(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


async def fresh_database(stores: Stores) -> str:
    """A new, empty database on the session's PostgreSQL server; its DSN. For a test whose
    work scales with the database (a resync walks every customer of it; a migration reads
    the whole ledger) or that needs it at an earlier migration."""
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    name = f"t_{secrets.token_hex(6)}"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return stores.postgres.dsn.rsplit("/", 1)[0] + f"/{name}"


async def provision_tenant(dsn: str, name: str | None = None) -> Tenant:
    tenant = Tenant(name or f"t-{secrets.token_hex(4)}")
    store = await PostgresStore.connect(
        ServiceSettings(
            database_url=dsn,  # type: ignore[arg-type]
            request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
            database_pool_min=1,
            database_pool_max=2,
        )
    )
    try:
        await store.migrate()
        for role in Role:
            plaintext, key_id, digest = generate_key()
            await store.upsert_api_key(
                ApiKeyRecord(digest, key_id, tenant.name, role, f"test-{role.value}")
            )
            tenant.keys[role.value] = plaintext
        await store.save_prices(tenant.name, parse_price_entries(tenant.name, PRICES), "tests")
    finally:
        await store.close()
    return tenant


def provision_tenant_sync(dsn: str, name: str | None = None) -> Tenant:
    return asyncio.run(provision_tenant(dsn, name))


class ServiceProcess:
    """`beam serve` as a child process on free loopback ports."""

    def __init__(self, stores: Stores, workdir: Path, **env: str) -> None:
        self.stores = stores
        self.workdir = workdir
        self.http_port = devservers.free_port()
        self.grpc_port = devservers.free_port()
        self.extra_env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"service-{self.http_port}.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        env = {
            **os.environ,
            **self.stores.env(),
            "BEAM_HTTP_PORT": str(self.http_port),
            "BEAM_GRPC_PORT": str(self.grpc_port),
            "BEAM_HTTP_HOST": "127.0.0.1",
            "BEAM_GRPC_HOST": "127.0.0.1",
            "BEAM_LOG_LEVEL": "INFO",
            "BEAM_REAPER_INTERVAL_SECONDS": "0.5",
            **self.extra_env,
        }
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "beam.cli.main", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"beam serve exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.http_url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"beam serve not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


@contextmanager
def running_service(stores: Stores, workdir: Path, **env: str) -> Iterator[ServiceProcess]:
    service = ServiceProcess(stores, workdir, **env).start()
    try:
        yield service
    finally:
        service.stop()
