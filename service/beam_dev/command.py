"""``beam dev``: the whole service on a laptop, with real Redis and PostgreSQL as children.

State (Redis AOF, PostgreSQL data) lives in ``--state-dir`` and is reused by the next run.
Seeds, idempotently: the dev price list, customer ``test_customer_1`` with 100000000
grains, and the well-known admin key ``beam_test_key_1234567890`` of tenant ``default``
(refused by any service not started in dev mode).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib.resources import files
from pathlib import Path

import click

from beam.api.server import serve
from beam.config import Environment, ServiceSettings
from beam.constants import (
    DEFAULT_TENANT,
    DEV_API_KEY,
    DEV_CUSTOMER_BALANCE_GRAINS,
    DEV_CUSTOMER_ID,
)
from beam.core.auth import hash_key
from beam.core.commands import LedgerCommand
from beam.core.pricing import load_price_file
from beam.core.reconcile import operator_principal
from beam.core.runtime import Runtime
from beam.records import ApiKeyRecord, Customer, Role
from beam_dev import servers


def dev_price_file() -> Path:
    return Path(str(files("beam_dev") / "devdata" / "prices.yaml"))


async def seed(runtime: Runtime) -> None:
    postgres = runtime.postgres
    await postgres.save_prices(
        DEFAULT_TENANT, load_price_file(dev_price_file(), DEFAULT_TENANT), "beam-dev"
    )
    await postgres.upsert_api_key(
        ApiKeyRecord(hash_key(DEV_API_KEY), "dev", DEFAULT_TENANT, Role.ADMIN, "beam-dev")
    )
    principal = operator_principal(DEFAULT_TENANT)
    await postgres.insert_customer(
        Customer(DEFAULT_TENANT, DEV_CUSTOMER_ID, "Test Customer 1", "dev-platform-user")
    )
    await runtime.admin.credit(
        principal,
        LedgerCommand(
            DEV_CUSTOMER_ID,
            DEV_CUSTOMER_BALANCE_GRAINS,
            "beam dev seed",
            f"dev-seed:{DEV_CUSTOMER_ID}",
        ),
    )
    await runtime.auth.reload()
    await runtime.prices.reload()


def banner(settings: ServiceSettings) -> str:
    http = f"http://localhost:{settings.http_port}"
    grpc = f"localhost:{settings.grpc_port}"
    return f"""
Beam dev is running (tenant "{DEFAULT_TENANT}", state kept between runs).
  REST  {http}   (OpenAPI docs: {http}/docs)
  gRPC  {grpc}   (reflection on: grpcurl -plaintext {grpc} list)
  key   {DEV_API_KEY}   (admin, dev only)

Try:
  curl -H "Authorization: Bearer {DEV_API_KEY}" {http}/v1/balance/{DEV_CUSTOMER_ID}
  beam balance get --customer-id {DEV_CUSTOMER_ID}
  grpcurl -plaintext -H "authorization: Bearer {DEV_API_KEY}" \\
    -d '{{"customer_id": "{DEV_CUSTOMER_ID}"}}' localhost:{settings.grpc_port} \\
    beam.balance.v1.BalanceService/GetBalance
Ctrl-C stops the service, Redis and PostgreSQL.
"""


def run_dev(state_dir: Path, http_port: int, grpc_port: int, log_level: str) -> None:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGHUP skip atexit: make them stop the child servers too (Ctrl-C is handled
    # by the ExitStack below).
    servers.stop_servers_on_signals()
    redis = servers.RedisServer(state_dir / "redis")
    postgres = servers.PostgresServer(state_dir / "postgres")
    click.echo(f"starting Redis and PostgreSQL in {state_dir} ...", err=True)
    with contextlib.ExitStack() as stack:
        redis.start()
        stack.callback(redis.stop)
        postgres.start()
        stack.callback(postgres.stop)
        settings = ServiceSettings(
            environment=Environment.DEV,
            redis_url=redis.url,
            database_url=postgres.dsn,
            http_port=http_port,
            grpc_port=grpc_port,
            migrate_on_start=True,
            log_level=log_level,
        )

        connection = state_dir / "connection.env"
        connection.write_text(f"BEAM_REDIS_URL={redis.url}\nBEAM_DATABASE_URL={postgres.dsn}\n")
        stack.callback(connection.unlink, missing_ok=True)

        async def main() -> None:
            runtime = await Runtime.create(settings, background=False)
            try:
                await seed(runtime)
            finally:
                await runtime.stop()
            await serve(settings, on_started=lambda _s: click.echo(banner(settings)))

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
        click.echo("stopping Redis and PostgreSQL ...", err=True)
