"""What the chart relies on `beam serve` for, proven on real processes and real stores.

- Behind PgBouncer (transaction pooling cannot carry LISTEN) the chart gives each service
  process BEAM_DATABASE_LISTEN_URL, a direct connection: key revocations must arrive through
  it, and it must come back when the connection drops.
- gRPC connections have a maximum age (GOAWAY), so clients reconnect and reach pods the
  autoscaler added.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from beam.adapters.postgres_store import PostgresStore
from beam.config import ServiceSettings
from beam.core.auth import hash_key
from tests.support.stack import TEST_TOKEN_SECRET, ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.timeout(180)

LISTEN_APP = "beam-direct-listen"


def _with_param(dsn: str, param: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}{param}"


async def _listeners(dsn: str) -> list[tuple[int, str]]:
    """(pid, application_name) of every backend that ran LISTEN last."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [(row["pid"], row["application_name"]) for row in rows]


async def _terminate(dsn: str, pids: list[int]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for pid in pids:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def _revoke(dsn: str, key: str) -> None:
    store = await PostgresStore.connect(
        ServiceSettings(
            database_url=dsn,  # type: ignore[arg-type]
            request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
            database_pool_min=1,
            database_pool_max=1,
        )
    )
    try:
        assert await store.revoke_api_keys({hash_key(key): datetime.now(UTC)}) == 1
    finally:
        await store.close()


async def _refused_within(service: ServiceProcess, key: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as client:
        while time.monotonic() < deadline:
            response = await client.get(
                "/v1/balance/nobody", headers={"Authorization": f"Bearer {key}"}
            )
            if response.status_code == 401:
                return True
            await asyncio.sleep(0.1)
    return False


async def test_revocations_arrive_on_the_direct_listen_connection(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    assert stores.postgres is not None
    dsn = stores.postgres.dsn
    service = ServiceProcess(
        stores,
        tmp_path,
        BEAM_DATABASE_LISTEN_URL=_with_param(dsn, f"application_name={LISTEN_APP}"),
        BEAM_CACHE_MAX_AGE_SECONDS="300",  # only a notification can invalidate in time
    ).start()
    try:
        deadline = time.monotonic() + 10
        while not any(app == LISTEN_APP for _, app in await _listeners(dsn)):
            assert time.monotonic() < deadline, await _listeners(dsn)
            await asyncio.sleep(0.1)
        # Silence the pool's own LISTEN (what transaction pooling does to it).
        pooled = [pid for pid, app in await _listeners(dsn) if app != LISTEN_APP]
        await _terminate(dsn, pooled)
        async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as client:
            for key in (tenant.keys["reader"], tenant.keys["enforcer"]):
                response = await client.get(
                    "/v1/balance/nobody", headers={"Authorization": f"Bearer {key}"}
                )
                assert response.status_code != 401, response.text  # cached as valid

        await _revoke(dsn, tenant.keys["reader"])
        assert await _refused_within(service, tenant.keys["reader"], 5)

        # The direct connection drops (failover, restart): it comes back by itself.
        direct = [pid for pid, app in await _listeners(dsn) if app == LISTEN_APP]
        await _terminate(dsn, direct)
        deadline = time.monotonic() + 15
        while not [p for p, a in await _listeners(dsn) if a == LISTEN_APP and p not in direct]:
            assert time.monotonic() < deadline, "the direct LISTEN connection did not come back"
            await asyncio.sleep(0.2)
        await _revoke(dsn, tenant.keys["enforcer"])
        assert await _refused_within(service, tenant.keys["enforcer"], 5)
        assert "Traceback" not in service.log_text()
    finally:
        service.stop()


async def _state_after_idle(service: ServiceProcess, seconds: float) -> grpc.ChannelConnectivity:
    """Connect, make one call, then wait (idle) up to `seconds` for the connection to close."""
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = channel.get_state()
            if state is not grpc.ChannelConnectivity.READY:
                return state
            await asyncio.sleep(0.1)
        return channel.get_state()


async def test_grpc_connections_are_closed_at_their_max_age(stores: Stores, tmp_path: Path) -> None:
    aged = ServiceProcess(
        stores,
        tmp_path,
        BEAM_GRPC_MAX_CONNECTION_AGE_SECONDS="1",
        BEAM_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS="1",
    ).start()
    try:
        assert await _state_after_idle(aged, 8) is grpc.ChannelConnectivity.IDLE
    finally:
        aged.stop()
    unlimited = ServiceProcess(stores, tmp_path, BEAM_GRPC_MAX_CONNECTION_AGE_SECONDS="0").start()
    try:
        assert await _state_after_idle(unlimited, 4) is grpc.ChannelConnectivity.READY
    finally:
        unlimited.stop()
