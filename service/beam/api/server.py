"""``beam serve``: gRPC and REST in one process, one event loop, one Runtime.

Start-up: the HTTP port opens first and answers /health 200 and /ready 503 ("starting"); the
stores are then waited for with back-off (PostgreSQL not up yet, the schema not migrated yet
by the operator or the migration Job, Redis or its sentinels not answering) for at most
``startup_timeout_seconds``, instead of exiting into a crash loop. A permanent error (a wrong
password) still fails at once.

Shutdown (SIGTERM/SIGINT) drains: readiness turns 503 and gRPC health NOT_SERVING first,
calls are still served for ``shutdown_delay_seconds`` (so load balancers stop sending), then
both servers stop accepting and wait up to ``shutdown_grace_seconds`` for in-flight calls,
and only then are the stores closed. An acknowledged Finalize is in PostgreSQL before its
reply is written, so even a SIGKILL loses nothing that was acknowledged.

Metrics: with ``metrics_port`` set (the chart always sets it), Prometheus metrics are served
on that port only, from start-up to the end of the drain, and the API port answers /metrics
404, so a NetworkPolicy can let Prometheus reach the metrics and nothing else. Unset (0, the
default, and ``beam dev``), ``GET /metrics`` is on the HTTP port with the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import asyncpg
import uvicorn
import uvloop
from prometheus_client import start_http_server

from beam.adapters.migrations import migration_files
from beam.adapters.redis_store import RedisStore
from beam.api.grpc_server import NOT_SERVING, SERVING, create_server
from beam.api.handlers import Handlers
from beam.api.rest import RestApi, create_app
from beam.config import ServiceSettings
from beam.constants import CHANNEL_API_KEYS, CHANNEL_PRICES
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason

log = logging.getLogger(__name__)

_LISTEN_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)


class DirectListener:
    """LISTEN for API key and price changes on a direct PostgreSQL connection
    (``BEAM_DATABASE_LISTEN_URL``), for when the pool goes through a transaction-mode pooler
    (PgBouncer) that cannot carry LISTEN. The connection is re-made with back-off when it
    drops; after a drop both caches are invalidated, since notifications may have been missed
    (the caches also reload on their own after ``cache_max_age_seconds``)."""

    def __init__(self, url: str, runtime: Runtime) -> None:
        self.url = url
        self.runtime = runtime
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _invalidate(self, channel: str) -> None:
        if channel == CHANNEL_API_KEYS:
            self.runtime.auth.invalidate()
        elif channel == CHANNEL_PRICES:
            self.runtime.prices.invalidate()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="beam-direct-listen")

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen(missed=failures > 0)
                log.warning("direct LISTEN connection lost; reconnecting")
                failures = 0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("direct LISTEN connection failed: %s", error)
            self.connected.clear()
            delay = _LISTEN_RETRY_SECONDS[min(failures, len(_LISTEN_RETRY_SECONDS) - 1)]
            failures += 1
            await asyncio.sleep(delay)

    async def _listen(self, *, missed: bool) -> None:
        """One connection's life: LISTEN, deliver, return when the connection closes."""
        closed = asyncio.Event()
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            conn.add_termination_listener(lambda _conn: closed.set())
            for channel in (CHANNEL_API_KEYS, CHANNEL_PRICES):
                await conn.add_listener(
                    channel, lambda _c, _pid, name, _payload: self._invalidate(name)
                )
            if missed:  # changes made while nobody listened
                self._invalidate(CHANNEL_API_KEYS)
                self._invalidate(CHANNEL_PRICES)
            self.connected.set()
            await closed.wait()
        finally:
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 10)
            self._task = None


class _Uvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: this module owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class FrontDoor:
    """The ASGI app uvicorn serves. Until the service's app is attached (start-up may wait for
    the stores), it answers /health 200 (the process is alive; no restart needed) and
    everything else 503 with status "starting"; then it hands every request to the app.
    A worker of `beam serve --workers N` names itself in an `x-beam-worker` header."""

    def __init__(self, worker: int | None = None) -> None:
        self.app: Any = None
        self.waiting_for = "the stores"
        self.worker = None if worker is None else str(worker).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.worker is not None and scope["type"] == "http":
            send = self._naming(send)
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        alive = scope.get("path") == "/health"
        body = {"status": "ok" if alive else "starting", "waiting_for": self.waiting_for}
        await send(
            {
                "type": "http.response.start",
                "status": 200 if alive else 503,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    def _naming(self, send: Any) -> Any:
        worker = self.worker

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-beam-worker", worker)]
                message = {**message, "headers": headers}
            await send(message)

        return named


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so every worker can listen on the same port and
    the kernel spreads new connections over them."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    return sock


class HttpServer:
    """Uvicorn on the HTTP port, started before the stores are reachable."""

    def __init__(self, settings: ServiceSettings, front: FrontDoor) -> None:
        config = uvicorn.Config(
            front,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        )
        self.server = _Uvicorn(config)
        self._task: asyncio.Task[None] | None = None
        self._sockets = (
            [reuse_port_socket(settings.http_host, settings.http_port)]
            if settings.reuse_port
            else None
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(self._sockets), name="beam-http")
        for _ in range(200):  # bounded: 10 s for the socket to bind
            if self.server.started or self._task.done():
                break
            await asyncio.sleep(0.05)
        if self._task.done():
            await self._task
            raise RuntimeError("the HTTP server stopped during start-up")

    async def stop(self, grace: float) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=grace + 5)


class Service:
    def __init__(
        self, settings: ServiceSettings, runtime: Runtime, http: HttpServer, front: FrontDoor
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.handlers = Handlers(runtime)
        self.rest = RestApi(self.handlers, settings.max_body_bytes)
        # A metrics port of their own (the chart's): the API port exposes no /metrics, so a
        # NetworkPolicy can admit Prometheus to the metrics port alone.
        self.app = create_app(self.rest, self.ready_checks, serve_metrics=not settings.metrics_port)
        self.http = http
        self.front = front
        self.grpc, self.health, self.grpc_port = create_server(
            self.handlers,
            f"{settings.grpc_host}:{settings.grpc_port}",
            settings.max_body_bytes,
            max_connection_age_seconds=settings.grpc_max_connection_age_seconds,
            max_connection_age_grace_seconds=settings.grpc_max_connection_age_grace_seconds,
            reuse_port=settings.reuse_port,
        )
        self.stopped = asyncio.Event()
        listen_url = settings.database_listen_url
        self.listener = (
            DirectListener(listen_url.get_secret_value(), runtime) if listen_url else None
        )

    async def ready_checks(self) -> dict[str, bool]:
        """What /ready needs besides accepting calls: every store, or (ready_stores=any) at
        least one, so one store's failover does not empty every replica's endpoints."""
        checks = await self.runtime.ready()
        if self.settings.ready_stores == "any":
            return {"stores": any(checks.values())}
        return checks

    async def start(self) -> None:
        if self.listener is not None:
            self.listener.start()
        await self.grpc.start()
        await self.health.set("", SERVING)
        await self.health.set(_BALANCE_SERVICE, SERVING)
        self.front.app = self.app
        log.info(
            "beam serving",
            extra={"grpc_port": self.grpc_port, "http_port": self.settings.http_port},
        )

    async def stop(self) -> None:
        """Drain: not ready first, still serving for shutdown_delay_seconds (load balancers
        stop sending), then stop accepting and give in-flight calls shutdown_grace_seconds."""
        self.rest.ready = False
        await self.health.set("", NOT_SERVING)
        await self.health.set(_BALANCE_SERVICE, NOT_SERVING)
        delay = self.settings.shutdown_delay_seconds
        if delay > 0:
            log.info("not ready; still serving before the drain", extra={"seconds": delay})
            await asyncio.sleep(delay)
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_seconds
        self.http.server.should_exit = True
        await self.grpc.stop(grace)
        await self.http.stop(grace)
        if self.listener is not None:
            await self.listener.stop()
        await self.runtime.stop()
        self.stopped.set()


_BALANCE_SERVICE = "beam.balance.v1.BalanceService"
_STARTUP_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)
# Failures that mean "not yet": a store starting, restarting or unreachable, or the schema
# still being migrated (by the operator, the migration Job or another replica). Anything
# else (a wrong password, a bad setting) fails start-up at once.
_NOT_READY = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # the database system is starting up / shutting down
    asyncpg.InsufficientResourcesError,  # too many connections
    asyncpg.InterfaceError,
    asyncpg.InvalidCatalogNameError,  # the database is still being created
    asyncpg.UndefinedTableError,
)


class SchemaNotReady(Exception):
    """The database lacks migrations this build ships, and this process does not migrate."""


def _not_ready(error: BaseException) -> bool:
    if isinstance(error, BeamError):
        return error.reason is Reason.STORE_UNAVAILABLE
    return isinstance(error, (SchemaNotReady, *_NOT_READY))


async def check_stores(settings: ServiceSettings) -> None:
    """Return when PostgreSQL answers with the schema this build needs (unless it migrates
    itself) and Redis answers; raise why not otherwise. Opens and closes one connection to
    each, so a failed attempt leaves no pool behind."""
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=5)
    try:
        if not settings.migrate_on_start:
            applied: set[str] = set()
            if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                rows = await conn.fetch("SELECT version FROM schema_migrations")
                applied = {row["version"] for row in rows}
            missing = sorted({path.stem for path in migration_files()} - applied)
            if missing:
                raise SchemaNotReady(
                    f"{len(missing)} migration(s) not applied yet, from {missing[0]} "
                    "(the operator or the migration Job applies them)"
                )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)
    redis = RedisStore.connect(settings)
    try:
        await redis.identity()
    finally:
        await redis.close()


async def open_runtime(
    settings: ServiceSettings, stop: asyncio.Event, front: FrontDoor | None = None
) -> Runtime | None:
    """Runtime.create, retried with back-off while the stores are not ready (instead of
    exiting into a crash-loop back-off that can outlast `helm install --wait`). None when
    `stop` is set first; raises when startup_timeout_seconds pass or on a permanent error."""
    timeout = settings.startup_timeout_seconds
    deadline = time.monotonic() + timeout if timeout > 0 else None
    attempt = 0
    while True:
        try:
            await check_stores(settings)
            return await Runtime.create(settings)
        except Exception as error:
            if not _not_ready(error):
                raise
            reason = f"{type(error).__name__}: {error}"
            if front is not None:  # the type only: /ready is reachable by every client
                front.waiting_for = type(error).__name__
            if deadline is not None and time.monotonic() >= deadline:
                log.error(
                    "stores still not ready; giving up", extra={"reason": reason, "after": timeout}
                )
                raise
            delay = _STARTUP_RETRY_SECONDS[min(attempt, len(_STARTUP_RETRY_SECONDS) - 1)]
            attempt += 1
            log.warning(
                "stores not ready; retrying start-up",
                extra={"reason": reason, "retry_in_seconds": delay, "attempt": attempt},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
                return None


class MetricsServer:
    """This process's Prometheus metrics on ``metrics_port`` (prometheus_client's own HTTP
    server, a thread), open from start-up to the end of the drain. Not in a worker of
    ``beam serve --workers N``: there the supervisor serves the workers' sum on that port."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.port = settings.metrics_port
        self.host = settings.http_host
        self._server: WSGIServer | None = None

    def start(self) -> None:
        self._server, _thread = start_http_server(self.port, addr=self.host)
        log.info("metrics served on their own port", extra={"metrics_port": self.port})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def serves_own_metrics(settings: ServiceSettings) -> bool:
    """Whether this process opens metrics_port itself: set, and not a supervised worker
    (reuse_port), whose supervisor holds that port."""
    return bool(settings.metrics_port) and not settings.reuse_port


async def serve(settings: ServiceSettings, *, on_started: object = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    front = FrontDoor(settings.worker if settings.reuse_port else None)
    http = HttpServer(settings, front)
    metrics = MetricsServer(settings) if serves_own_metrics(settings) else None
    service: Service | None = None
    try:
        if metrics is not None:
            metrics.start()
        await http.start()
        runtime = await open_runtime(settings, stop, front)
        if runtime is None:
            log.info("stopped during start-up")
            return
        service = Service(settings, runtime, http, front)
        await service.start()
        # Everything allocated so far (modules, caches, the servers) lives as long as the
        # process: out of the collector's way, so a full collection no longer walks it.
        gc.collect()
        gc.freeze()
        if callable(on_started):
            on_started(service)
        await stop.wait()
        log.info("shutting down: draining in-flight calls")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if service is not None:
            await service.stop()
        else:
            await http.stop(0)
        if metrics is not None:
            await metrics.stop()


def run(settings: ServiceSettings) -> None:
    """One ``beam serve`` process, on uvloop: grpcio's asyncio server and redis-py run on
    any asyncio loop, and libuv's costs per wake-up, socket read and callback are a fraction
    of the standard loop's (measured: docs/PERFORMANCE.md, ADR 0011)."""
    uvloop.run(serve(settings))


def run_workers(settings: ServiceSettings, env: Mapping[str, str]) -> int:
    """`beam serve --workers N`: supervise N worker processes that share the gRPC and HTTP
    ports (SO_REUSEPORT; the kernel spreads connections over them). SIGTERM/SIGINT are passed
    to every worker, each drains as one process would; when a worker exits on its own, the
    others are stopped too and the supervisor exits with its status (the container restarts).
    With metrics_port set, the workers' metrics are summed there (prometheus_client's
    multiprocess mode) and no worker serves /metrics on the API port; unset, each worker's
    /metrics on the API port shows only itself. Returns the exit status."""
    from prometheus_client import CollectorRegistry, multiprocess

    reservations = []  # port 0: pick a port once, so every worker binds the same one
    ports = {}
    for name, host, port in (
        ("BEAM_HTTP_PORT", settings.http_host, settings.http_port),
        ("BEAM_GRPC_PORT", settings.grpc_host, settings.grpc_port),
    ):
        if port == 0:
            reservations.append(reuse_port_socket(host, 0))
            port = reservations[-1].getsockname()[1]
        ports[name] = str(port)
    metrics_dir = tempfile.mkdtemp(prefix="beam-metrics-")
    base = {
        **env,
        **ports,
        "BEAM_WORKERS": "1",
        "BEAM_REUSE_PORT": "true",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    if settings.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        start_http_server(settings.metrics_port, addr=settings.http_host, registry=registry)
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for process in workers.values():
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for index in range(settings.workers):
            workers[index] = subprocess.Popen(
                [sys.executable, "-m", "beam.cli.main", "serve"],
                env={**base, "BEAM_WORKER": str(index)},
            )
        log.info(
            "beam serving with workers",
            extra={"workers": settings.workers, **{k.lower(): v for k, v in ports.items()}},
        )
        running = dict(workers)
        while running:
            pid, code = os.wait()
            exited = next((i for i, p in running.items() if p.pid == pid), None)
            if exited is None:
                continue
            process = running.pop(exited)
            process.returncode = os.waitstatus_to_exitcode(code)
            if process.returncode != 0:
                status = status or process.returncode
            if not stopping.is_set():
                log.error(
                    "worker exited; stopping the others",
                    extra={"worker": exited, "status": process.returncode},
                )
                status = status or 1
                forward(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in workers.values():
            if process.poll() is None:
                process.kill()
        for sock in reservations:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
