"""``beam serve``: gRPC and REST in one process, one event loop, one Runtime.

Shutdown (SIGTERM/SIGINT) drains: readiness turns 503 and gRPC health NOT_SERVING first (so
load balancers stop sending), then both servers stop accepting and wait up to
``shutdown_grace_seconds`` for in-flight calls, and only then are the stores closed. An
acknowledged Finalize is in PostgreSQL before its reply is written, so even a SIGKILL
loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator

import asyncpg
import uvicorn

from beam.api.grpc_server import NOT_SERVING, SERVING, create_server
from beam.api.handlers import Handlers
from beam.api.rest import RestApi, create_app
from beam.config import ServiceSettings
from beam.constants import CHANNEL_API_KEYS, CHANNEL_PRICES
from beam.core.runtime import Runtime

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


class Service:
    def __init__(self, settings: ServiceSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.handlers = Handlers(runtime)
        self.rest = RestApi(self.handlers, settings.max_body_bytes)
        self.app = create_app(self.rest, runtime.ready)
        self.grpc, self.health, self.grpc_port = create_server(
            self.handlers,
            f"{settings.grpc_host}:{settings.grpc_port}",
            settings.max_body_bytes,
            max_connection_age_seconds=settings.grpc_max_connection_age_seconds,
            max_connection_age_grace_seconds=settings.grpc_max_connection_age_grace_seconds,
        )
        config = uvicorn.Config(
            self.app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        )
        self.http = _Uvicorn(config)
        self._http_task: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        listen_url = settings.database_listen_url
        self.listener = (
            DirectListener(listen_url.get_secret_value(), runtime) if listen_url else None
        )

    async def start(self) -> None:
        if self.listener is not None:
            self.listener.start()
        await self.grpc.start()
        await self.health.set("", SERVING)
        await self.health.set("beam.balance.v1.BalanceService", SERVING)
        self._http_task = asyncio.create_task(self.http.serve(), name="beam-http")
        for _ in range(200):  # bounded: 10 s for the socket to bind
            if self.http.started or self._http_task.done():
                break
            await asyncio.sleep(0.05)
        if self._http_task.done():
            await self._http_task
            raise RuntimeError("the HTTP server stopped during start-up")
        log.info(
            "beam serving",
            extra={"grpc_port": self.grpc_port, "http_port": self.settings.http_port},
        )

    async def stop(self) -> None:
        self.rest.ready = False
        await self.health.enter_graceful_shutdown()
        await self.health.set("", NOT_SERVING)
        grace = self.settings.shutdown_grace_seconds
        self.http.should_exit = True
        await self.grpc.stop(grace)
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=grace + 5)
        if self.listener is not None:
            await self.listener.stop()
        await self.runtime.stop()
        self.stopped.set()


async def serve(settings: ServiceSettings, *, on_started: object = None) -> None:
    runtime = await Runtime.create(settings)
    service = Service(settings, runtime)
    await service.start()
    if callable(on_started):
        on_started(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: draining in-flight calls")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await service.stop()
