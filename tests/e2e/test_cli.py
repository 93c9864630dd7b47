"""The `beam` client commands against a running service, as a user runs them.

Each command runs as `python -m beam.cli.main ...` with `--server` and `--api-key`. Tables
are parsed by their header's column positions and compared with exact values; `--json`
output must parse and carry the same values as the API's proto3 JSON. Errors go to stderr
as `error: <REASON>: <message>` with exit status 1; an unreachable server is 3; a usage
error is 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from beam.constants import account_key
from beam_dev import servers as devservers
from tests.e2e.conftest import Api, create_customer, ok_json, open_hold, rest_balance
from tests.support.stack import ServiceProcess, Stores, Tenant


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        assert self.code == 0, self
        data = json.loads(self.stdout)
        assert isinstance(data, dict)
        return data

    def table(self) -> list[dict[str, str]]:
        assert self.code == 0, self
        assert self.stderr == "", self
        return parse_table(self.stdout)


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the CLI's table, cut at the header's column starts (values may hold spaces)."""
    header, *lines = text.rstrip("\n").split("\n")
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = [header[s:].split()[0].lower() for s in starts]
    rows = []
    for line in lines:
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


async def beam(*args: str, env: dict[str, str] | None = None) -> Run:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BEAM_")}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "beam.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base_env, **(env or {})},
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def client(service: ServiceProcess, key: str) -> list[str]:
    return ["--server", service.http_url, "--api-key", key]


async def test_customers_create_and_balance_commands(
    service: ServiceProcess, tenant: Tenant
) -> None:
    admin = client(service, tenant.keys["admin"])
    created = await beam(
        "customers", "create", "--customer-id", "cli_c1", "--name", "CLI One",
        "--balance", "5000", *admin,
    )  # fmt: skip
    assert created.table() == [
        {"customer_id": "cli_c1", "display_name": "CLI One", "balance": "5000",
         "available": "5000", "state": "ACTIVE"},
    ]  # fmt: skip
    again = await beam(
        "customers", "create", "--customer-id", "cli_c1", "--name", "CLI One",
        "--balance", "5000", "--json", *admin,
    )  # fmt: skip
    data = again.json()
    assert (data["customer_id"], data["display_name"], data["balance"], data["reserved"]) == (
        "cli_c1", "CLI One", "5000", "0",
    )  # fmt: skip

    got = await beam("balance", "get", "--customer-id", "cli_c1", *admin)
    assert got.table() == [
        {"customer_id": "cli_c1", "balance": "5000", "reserved": "0", "available": "5000"}
    ]
    added = await beam(
        "balance", "add", "--customer-id", "cli_c1", "--amount", "2500",
        "--description", "top-up", "--transaction-id", "tx-cli-1", *admin,
    )  # fmt: skip
    assert added.table() == [
        {"transaction_id": "tx-cli-1", "balance": "7500", "available": "7500",
         "replayed": "False"},
    ]  # fmt: skip
    replay = await beam(
        "balance", "add", "--customer-id", "cli_c1", "--amount", "2500",
        "--transaction-id", "tx-cli-1", "--json", *admin,
    )  # fmt: skip
    assert replay.json() == {
        "transaction_id": "tx-cli-1", "balance": "7500", "available": "7500", "replayed": True,
    }  # fmt: skip
    deducted = await beam(
        "balance", "deduct", "--customer-id", "cli_c1", "--amount", "1000",
        "--description", "fee", "--transaction-id", "tx-cli-2", "--json", *admin,
    )  # fmt: skip
    assert deducted.json() == {
        "transaction_id": "tx-cli-2", "balance": "6500", "available": "6500", "replayed": False,
    }  # fmt: skip
    # The key from the environment, JSON out: the same numbers the API reports.
    env = {"BEAM_REST_URL": service.http_url, "BEAM_API_KEY": tenant.keys["reader"]}
    read = await beam("balance", "get", "--customer-id", "cli_c1", "--json", env=env)
    assert read.json() == {"balance": "6500", "reserved": "0", "available": "6500"}


async def test_requests_list_and_show_after_a_request_made_over_rest(
    service: ServiceProcess, tenant: Tenant, api: Api
) -> None:
    await create_customer(api, tenant, "cli_r", 100_000)
    token = await open_hold(api, tenant, "cli_r", "req-cli-1", 10_000)
    final = await api.rest(
        "finalize",
        {"customer_id": "cli_r", "request_id": "req-cli-1", "status": "COMPLETED_SUCCESS",
         "actual_prompt_tokens": 100, "actual_completion_tokens": 50, "request_token": token},
        tenant.keys["enforcer"],
    )  # fmt: skip
    # gpt-4: 100 x 30 + 50 x 60 = 6000 grains of the 10000 held.
    assert ok_json(final)["charged_grains"] == "6000"
    reader = client(service, tenant.keys["reader"])

    listed = await beam("requests", "list", "--customer-id", "cli_r", "--limit", "5", *reader)
    assert listed.table() == [
        {"request_id": "req-cli-1", "status": "completed", "model": "gpt-4",
         "reserved_grains": "10000", "actual_cost_grains": "6000", "refunded_grains": "4000",
         "prompt_tokens": "100", "completion_tokens": "50", "let_through": "False"},
    ]  # fmt: skip
    as_json = (await beam("requests", "list", "--customer-id", "cli_r", "--json", *reader)).json()
    assert [(r["request_id"], r["actual_cost_grains"], r["overage_grains"])
            for r in as_json["requests"]] == [("req-cli-1", "6000", "0")]  # fmt: skip

    shown = await beam("requests", "show", "--request-id", "req-cli-1", *reader)
    assert shown.code == 0, shown
    fields = dict(line.strip().split(None, 1) for line in shown.stdout.strip().splitlines())
    assert {k: fields[k] for k in ("request_id", "customer_id", "model", "status",
                                   "reserved_grains", "actual_cost_grains",
                                   "refunded_grains", "prompt_tokens",
                                   "completion_tokens")} == {
        "request_id": "req-cli-1", "customer_id": "cli_r", "model": "gpt-4",
        "status": "completed", "reserved_grains": "10000", "actual_cost_grains": "6000",
        "refunded_grains": "4000", "prompt_tokens": "100", "completion_tokens": "50",
    }  # fmt: skip
    shown_json = await beam(
        "requests", "show", "--request-id", "req-cli-1", "--customer-id", "cli_r", "--json",
        *reader,
    )  # fmt: skip
    data = shown_json.json()
    assert (data["customer_id"], data["estimated_grains"], data["consumed_grains"]) == (
        "cli_r", "10000", "0",
    )  # fmt: skip
    assert int(data["settled_at_unix_ms"]) >= int(data["created_at_unix_ms"]) > 0


async def test_admin_verify_integrity_and_sync_all(
    service: ServiceProcess, stores: Stores, tenant: Tenant, api: Api
) -> None:
    admin = client(service, tenant.keys["admin"])
    await create_customer(api, tenant, "cli_v1", 1_000)
    await create_customer(api, tenant, "cli_v2", 2_000)
    await open_hold(api, tenant, "cli_v2", "req-held", 500)

    verified = await beam("admin", "verify-integrity", *admin)
    assert verified.table() == [
        {"customer_id": "cli_v1", "ledger_sum_grains": "1000", "postgres_balance": "1000",
         "redis_balance": "1000", "redis_held": "0", "open_holds_sum": "0",
         "held_unverified": "False", "ok": "True", "problems": "-"},
        {"customer_id": "cli_v2", "ledger_sum_grains": "2000", "postgres_balance": "2000",
         "redis_balance": "2000", "redis_held": "500", "open_holds_sum": "500",
         "held_unverified": "False", "ok": "True", "problems": "-"},
    ]  # fmt: skip
    one = await beam("admin", "verify-integrity", "--customer-id", "cli_v2", "--json", *admin)
    assert (one.json()["ok"], one.json()["customers_checked"]) == (True, "1")

    # Drift: Redis believes cli_v1 has 999999 grains. verify finds it and exits 1 ...
    redis = aioredis.Redis.from_url(stores.redis.url)
    try:
        await redis.hset(account_key(tenant.name, "cli_v1"), "balance", "999999")
    finally:
        await redis.aclose()
    drift = await beam("admin", "verify-integrity", *admin)
    assert drift.code == 1, drift
    assert drift.stderr == "error: integrity check found drift (see problems)\n"
    rows = {r["customer_id"]: r for r in parse_table(drift.stdout)}
    assert (rows["cli_v1"]["redis_balance"], rows["cli_v1"]["ok"]) == ("999999", "False")
    assert rows["cli_v1"]["problems"].startswith("redis balance 999999")
    assert rows["cli_v2"]["ok"] == "True"

    # ... and sync-all rebuilds Redis from PostgreSQL, keeping the open hold.
    synced = await beam("admin", "sync-all", *admin)
    assert synced.table() == [{"customers_synced": "2", "open_holds_kept": "1"}]
    assert (await beam("admin", "sync-all", "--json", *admin)).json() == {
        "customers_synced": "2", "open_holds_kept": "1",
    }  # fmt: skip
    assert (await beam("admin", "verify-integrity", "--json", *admin)).json()["ok"] is True
    assert await rest_balance(api, tenant, "cli_v1") == (1_000, 0, 1_000)
    assert await rest_balance(api, tenant, "cli_v2") == (2_000, 500, 1_500)


async def test_errors_print_the_reason_and_exit_1(service: ServiceProcess, tenant: Tenant) -> None:
    admin = client(service, tenant.keys["admin"])
    cases = [
        (["balance", "get", "--customer-id", "nobody", *admin],
         "error: CUSTOMER_NOT_FOUND: customer 'nobody' not found"),
        (["balance", "add", "--customer-id", "nobody", "--amount", "-5", *admin],
         "error: OUT_OF_RANGE: amount_grains: must be between 1 and 9007199254740991"),
        (["balance", "get", "--customer-id", "bad id", *admin],
         "error: INVALID_FIELD: customer_id: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"),
        (["balance", "add", "--customer-id", "x", "--amount", "5",
          *client(service, tenant.keys["reader"])],
         "error: PERMISSION_DENIED: a reader key cannot perform admin calls"),
        (["balance", "get", "--customer-id", "x", *client(service, "beam_sk_0_nope")],
         "error: UNAUTHENTICATED: invalid, expired or revoked API key"),
        # Without --api-key the CLI offers the dev key to a local server; this one is not dev.
        (["balance", "get", "--customer-id", "x", "--server", service.http_url],
         "error: UNAUTHENTICATED: the dev key is refused outside dev mode"),
        (["requests", "show", "--request-id", "req-none", *admin],
         "error: REQUEST_NOT_FOUND: no settled request 'req-none'"),
    ]  # fmt: skip
    for args, expected in cases:
        run = await beam(*args)
        assert (run.code, run.stdout, run.stderr) == (1, "", expected + "\n"), args
    await beam("customers", "create", "--customer-id", "cli_e", "--name", "First", *admin)
    taken = await beam("customers", "create", "--customer-id", "cli_e", "--name", "Other", *admin)
    assert (taken.code, taken.stderr) == (
        1,
        "error: CUSTOMER_EXISTS: customer 'cli_e' already exists\n",
    )


async def test_an_unreachable_server_exits_3(tenant: Tenant) -> None:
    closed = f"http://127.0.0.1:{devservers.free_port()}"
    run = await beam("balance", "get", "--customer-id", "x", "--server", closed,
                     "--api-key", tenant.keys["admin"])  # fmt: skip
    assert (run.code, run.stdout) == (3, "")
    assert run.stderr.startswith(f"error: cannot reach {closed}: "), run.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["balance", "get"], "Missing option '--customer-id'"),
        (["balance", "add", "--customer-id", "x"], "Missing option '--amount'"),
        (["balance", "add", "--customer-id", "x", "--amount", "ten"],
         "'ten' is not a valid integer"),
        (["requests", "list", "--customer-id", "x", "--limit", "0"],
         "0 is not in the range 1<=x<=1000"),
        (["customers", "create", "--customer-id", "x", "--buffer-strategy", "wild"],
         "'wild' is not one of"),
        (["balance", "teleport"], "No such command 'teleport'"),
        (["admin", "verify-integrity", "--bogus"], "No such option '--bogus'"),
    ],
)  # fmt: skip
async def test_usage_errors_exit_2(
    service: ServiceProcess, args: list[str], complaint: str
) -> None:
    run = await beam(*args, "--server", service.http_url)
    assert (run.code, run.stdout) == (2, ""), run
    assert complaint in run.stderr, run.stderr


async def test_balance_check_shortens_and_releases(service: ServiceProcess, tenant: Tenant) -> None:
    """`beam balance check` (issue 16 item 6). gpt-4: 30 grains per prompt token, 60 per
    completion token. 1 000 grains: 1 000 completion tokens (60 300) are not affordable;
    with --min-tokens 10 the grant is the most the balance pays for: 300 + 60t <= 1 000,
    t = 11 (960 grains). --release (the default) gives the hold back at once."""
    admin = client(service, tenant.keys["admin"])
    await beam("customers", "create", "--customer-id", "cli_chk", "--name", "Chk",
               "--balance", "1000", *admin)  # fmt: skip
    ask = ["balance", "check", "--customer-id", "cli_chk", "--model", "gpt-4", "--prompt-tokens",
           "10", "--max-tokens", "1000", "--buffer-multiplier", "1.0"]  # fmt: skip
    shortened = await beam(*ask, "--min-tokens", "10", "--request-id", "cli_r1", *admin)
    assert shortened.table() == [
        {"request_id": "cli_r1", "approved": "True", "rejection_reason": "",
         "reserved_grains": "960", "granted_completion_tokens": "11",
         "remaining_balance": "40"},
    ]  # fmt: skip
    got = await beam("balance", "get", "--customer-id", "cli_chk", "--json", *admin)
    assert got.json() == {"balance": "1000", "reserved": "0", "available": "1000"}
    refused = await beam(*ask, "--min-tokens", "20", "--json", *admin)
    data = refused.json()
    assert (data["approved"], data["rejection_reason"], data["remaining_balance"]) == (
        False, "INSUFFICIENT_BALANCE", "1000",
    )  # fmt: skip
    kept = await beam(*ask, "--min-tokens", "10", "--keep", "--json", *admin)
    assert (kept.json()["reserved_grains"], kept.json()["granted_completion_tokens"]) == (
        "960", "11",
    )  # fmt: skip
    got = await beam("balance", "get", "--customer-id", "cli_chk", "--json", *admin)
    assert got.json() == {"balance": "1000", "reserved": "960", "available": "40"}
