"""``beam dev``: the whole service on a laptop, with real Redis and PostgreSQL as children.

State (Redis AOF, PostgreSQL data) lives in ``--state-dir`` and is reused by the next run.
Seeds, idempotently: the dev price list, customer ``test_customer_1`` with 100000000
grains, the customers docs/INTEGRATION.md's examples name (``cus_42`` with 10000000 grains,
``cus_broke`` with 5, too few for any call), and the well-known admin key
``beam_test_key_1234567890`` of tenant ``default`` (refused by any service not started in
dev mode). Each seed credit has a fixed transaction id, so a restart never tops a customer
up again: the state, spent or not, is the previous run's.
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

# The customers docs/INTEGRATION.md's examples use: (id, display name, opening grains).
DOCS_CUSTOMERS = (
    ("cus_42", "Docs example customer", 10_000_000),
    ("cus_broke", "Docs example customer who cannot pay", 5),
)
# The ports the CLI and the client reach without being told (beam serve's defaults).
DEFAULT_HTTP_PORT: int = ServiceSettings.model_fields["http_port"].default
DEFAULT_GRPC_PORT: int = ServiceSettings.model_fields["grpc_port"].default


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
    customers = (
        (DEV_CUSTOMER_ID, "Test Customer 1", DEV_CUSTOMER_BALANCE_GRAINS),
        *DOCS_CUSTOMERS,
    )
    principal = operator_principal(DEFAULT_TENANT)
    for customer_id, name, grains in customers:
        await postgres.insert_customer(
            Customer(DEFAULT_TENANT, customer_id, name, "dev-platform-user")
        )
        await runtime.admin.credit(
            principal,
            LedgerCommand(customer_id, grains, "beam dev seed", f"dev-seed:{customer_id}"),
        )
    await runtime.auth.reload()
    await runtime.prices.reload()


def banner(settings: ServiceSettings) -> str:
    """What ``beam dev`` prints once it serves: every command in it reaches this instance,
    whatever its ports (off the defaults, the CLI gets ``--server`` and the other shells
    the two variables)."""
    http = f"http://localhost:{settings.http_port}"
    grpc = f"localhost:{settings.grpc_port}"
    default_http = settings.http_port == DEFAULT_HTTP_PORT
    server = "" if default_http else f" --server {http}"
    other_shells = ""
    if not default_http or settings.grpc_port != DEFAULT_GRPC_PORT:
        other_shells = f"""
In another shell (the CLI reads BEAM_REST_URL, the Python client BEAM_GRPC_TARGET):
  export BEAM_REST_URL={http} BEAM_GRPC_TARGET={grpc}"""
    docs_customers = ", ".join(customer_id for customer_id, _, _ in DOCS_CUSTOMERS)
    return f"""
Beam dev is running (tenant "{DEFAULT_TENANT}", state kept between runs).
  REST  {http}   (OpenAPI docs: {http}/docs)
  gRPC  {grpc}   (reflection on: grpcurl -plaintext {grpc} list)
  key   {DEV_API_KEY}   (admin, dev only)
  customers  {DEV_CUSTOMER_ID}; {docs_customers} (docs/INTEGRATION.md's examples)

Try:
  curl -H "Authorization: Bearer {DEV_API_KEY}" {http}/v1/balance/{DEV_CUSTOMER_ID}
  beam balance get --customer-id {DEV_CUSTOMER_ID}{server}
  grpcurl -plaintext -H "authorization: Bearer {DEV_API_KEY}" \\
    -d '{{"customer_id": "{DEV_CUSTOMER_ID}"}}' {grpc} \\
    beam.balance.v1.BalanceService/GetBalance{other_shells}
Ctrl-C stops the service, Redis and PostgreSQL.
"""


def run_dev(state_dir: Path, http_port: int, grpc_port: int, log_level: str) -> None:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGHUP skip atexit: make them stop the child servers too (Ctrl-C is handled
    # by the ExitStack below).
    servers.stop_servers_on_signals()
    redis = servers.RedisServer(state_dir / "redis")
    # TimescaleDB installed (as most packages leave it) is usable only when preloaded.
    bin_dir = servers.find_pg_bin_dir().path
    timescaledb = servers.has_timescaledb(bin_dir)
    postgres = servers.PostgresServer(
        state_dir / "postgres",
        bin_dir=bin_dir,
        preload_libraries=("timescaledb",) if timescaledb else (),
        extra_settings={"timescaledb.telemetry_level": "off"} if timescaledb else None,
    )
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
