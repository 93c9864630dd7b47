"""What the chart relies on `beam serve` for, proven on real processes and real stores.

- Behind PgBouncer (transaction pooling cannot carry LISTEN) the chart gives each service
  process BEAM_DATABASE_LISTEN_URL, a direct connection: key revocations must arrive through
  it, and it must come back when the connection drops.
- gRPC connections have a maximum age (GOAWAY), so clients reconnect and reach pods the
  autoscaler added.
- Start-up waits (with back-off) for PostgreSQL and for the schema instead of exiting: a
  first install starts the service before the database, and before the operator migrated.
- A stopping pod keeps serving, unready, for the drain delay (Endpoints catch up), then drains.
- Readiness can ask for any store instead of all: one store's failover does not take every
  replica out of its Service.
- `beam serve --workers N` (BEAM_WORKERS): N processes share the gRPC and HTTP ports
  (SO_REUSEPORT), all of them serve, their metrics are summed on one port, and SIGTERM
  drains them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
import uuid
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
from beam_dev import servers as devservers
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


class Forwarder:
    """A TCP port that refuses connections until `open()`, then forwards them to a target:
    a database that is not up yet, then is."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = devservers.free_port()
        self._listener: socket.socket | None = None
        self._closed = False

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.close()


def _dsn_parts(dsn: str) -> tuple[str, str, int, str]:
    """(prefix up to the host, host, port, rest) of postgresql://user@host:port/db?..."""
    scheme, _, rest = dsn.partition("://")
    userinfo, _, hostpart = rest.rpartition("@")
    hostport, _, tail = hostpart.partition("/")
    host, _, port = hostport.rpartition(":")
    return f"{scheme}://{userinfo}@", host, int(port), tail


def test_start_up_waits_for_postgresql(stores: Stores, tmp_path: Path) -> None:
    assert stores.postgres is not None
    prefix, host, port, tail = _dsn_parts(stores.postgres.dsn)
    database = Forwarder(host, port)
    late = f"{prefix}127.0.0.1:{database.port}/{tail}"
    service = ServiceProcess(stores, tmp_path, BEAM_DATABASE_URL=late)
    timer = threading.Timer(4.0, database.open)
    timer.start()
    try:
        service.start(timeout=60)  # raises if `beam serve` exits before it is ready
        log = service.log_text()
        assert "stores not ready; retrying start-up" in log
        assert "ConnectionRefusedError" in log
    finally:
        timer.cancel()
        service.stop()
        database.close()


async def test_start_up_waits_for_the_schema(stores: Stores, tmp_path: Path) -> None:
    assert stores.postgres is not None
    admin = await asyncpg.connect(stores.postgres.dsn)
    name = f"beam_empty_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    prefix, host, port, _ = _dsn_parts(stores.postgres.dsn)
    empty = f"{prefix}{host}:{port}/{name}"
    service = ServiceProcess(
        stores, tmp_path, BEAM_DATABASE_URL=empty, BEAM_MIGRATE_ON_START="false"
    )
    try:
        starting = asyncio.get_running_loop().run_in_executor(None, service.start, 60)
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, service.log_tail()
                try:
                    ready = await client.get(f"{service.http_url}/ready")
                    health = await client.get(f"{service.http_url}/health")
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
                    continue
                if ready.json().get("waiting_for") == "SchemaNotReady":
                    break
                await asyncio.sleep(0.2)
            assert (health.status_code, ready.status_code) == (200, 503)
            assert ready.json() == {"status": "starting", "waiting_for": "SchemaNotReady"}
        await asyncio.sleep(2)
        assert service.process is not None
        assert service.process.poll() is None, service.log_tail()  # waiting, not exiting
        migrator = await PostgresStore.connect(
            ServiceSettings(
                database_url=empty,  # type: ignore[arg-type]
                request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
                database_pool_min=1,
                database_pool_max=1,
            )
        )
        try:
            await migrator.migrate()  # what the operator does when it starts
        finally:
            await migrator.close()
        await starting  # ready now
        assert "SchemaNotReady" in service.log_text()
    finally:
        service.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_stopping_pod_keeps_serving_unready_then_drains(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    service = ServiceProcess(stores, tmp_path, BEAM_SHUTDOWN_DELAY_SECONDS="3").start()
    assert service.process is not None
    headers = tenant.header("reader")
    async with (
        httpx.AsyncClient(base_url=service.http_url, timeout=5) as client,
        grpc.aio.insecure_channel(service.grpc_target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        service.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await asyncio.sleep(0.5)
        assert (await client.get("/ready")).status_code == 503
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        served = 0
        while time.monotonic() - stopped_at < 2.5:  # well inside the 3 s delay
            response = await client.get("/v1/balance/nobody", headers=headers)
            assert response.status_code == 404, response.text  # answered, not refused
            served += 1
            await asyncio.sleep(0.1)
        assert served >= 10
    code = await asyncio.get_running_loop().run_in_executor(None, service.process.wait, 30)
    assert code == 0, service.log_tail()
    assert time.monotonic() - stopped_at >= 3
    assert "not ready; still serving before the drain" in service.log_text()


async def test_readiness_can_survive_one_store_down(stores: Stores, tmp_path: Path) -> None:
    redis = devservers.RedisServer(tmp_path / "redis")
    redis.start()
    try:
        services = {
            mode: ServiceProcess(
                stores, tmp_path, BEAM_REDIS_URL=redis.url, BEAM_READY_STORES=mode
            ).start()
            for mode in ("any", "all")
        }
        try:
            redis.stop()  # a Redis failover, from the service's point of view
            async with httpx.AsyncClient(timeout=10) as client:
                deadline = time.monotonic() + 15
                while True:
                    codes = {
                        mode: (await client.get(f"{svc.http_url}/ready")).status_code
                        for mode, svc in services.items()
                    }
                    if codes == {"any": 200, "all": 503} or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
            assert codes == {"any": 200, "all": 503}
        finally:
            for svc in services.values():
                svc.stop()
    finally:
        redis.stop()


def _listening_pids(port: int, pids: list[int]) -> set[int]:
    """Which of `pids` hold a listening TCP socket on `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    owners = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners.add(pid)
    return owners


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


async def test_workers_share_the_ports_and_all_serve(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    metrics_port = devservers.free_port()
    service = ServiceProcess(
        stores, tmp_path, BEAM_WORKERS="2", BEAM_METRICS_PORT=str(metrics_port)
    ).start(timeout=60)
    assert service.process is not None
    try:
        workers = _children(service.process.pid)
        assert len(workers) == 2, workers
        grpc_port = int(service.grpc_target.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30  # /ready answered from one worker; wait for both
        while _listening_pids(service.http_port, workers) != set(workers) or _listening_pids(
            grpc_port, workers
        ) != set(workers):
            assert time.monotonic() < deadline, service.log_tail()
            await asyncio.sleep(0.2)

        seen: set[str] = set()
        calls = 0
        while seen != {"0", "1"} and calls < 200:
            async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as client:
                response = await client.get("/v1/balance/nobody", headers=tenant.header("reader"))
            assert response.status_code == 404, response.text
            seen.add(response.headers["x-beam-worker"])
            calls += 1
        assert seen == {"0", "1"}  # the kernel spread new connections over both
        for _ in range(4):  # gRPC too, on fresh connections
            async with grpc.aio.insecure_channel(service.grpc_target) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING

        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("beam_call_duration_seconds_count{")
            and 'call="get_balance"' in line
            and 'transport="rest"' in line
        )
        assert counted == calls, text[:2000]  # both workers' calls, summed

        service.process.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, service.process.wait, 30)
        assert code == 0, service.log_tail()
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]  # noqa: ASYNC240
    finally:
        service.stop()
