"""The money invariants of docs/ARCHITECTURE.md, proven on every Redis topology.

No overspend under real concurrency (several client processes, two service replicas),
exactly-once for every mutation, expiry of abandoned holds at their consumed amount,
zero drift after a mixed workload, and `sync` rebuilding Redis from PostgreSQL. Numbers
are exact: every balance below is computed by hand from the prices in tests/support/stack.py
(cheap: 1 grain per input token, 2 per output token; gpt-4: 30 and 60).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis
from redis.cluster import RedisCluster

from beam.constants import SCRIPT_LOAD_ACCOUNT, account_key
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.reaper import Reaper
from beam.core.runtime import Runtime
from beam.records import Customer, EntryType, Role
from tests.support.load import Lifecycle, Plan, run_workers
from tests.support.rest import Rest, rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.topology


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def api(topology_service: ServiceProcess, topology_tenant: Tenant) -> AsyncIterator[Rest]:
    async with rest_client(topology_service, topology_tenant) as rest:
        yield rest


@pytest.fixture(scope="module")
def second_replica(
    topology_stores: Stores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Another `beam serve` on the same stores: two replicas share no lock but the stores."""
    replica = ServiceProcess(topology_stores, tmp_path_factory.mktemp("replica")).start()
    try:
        yield replica
    finally:
        replica.stop()


async def pg_rows(stores: Stores, sql: str, *args: Any) -> list[asyncpg.Record]:
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def ledger_counts(stores: Stores, tenant: str, customer_id: str) -> tuple[int, int, int]:
    """(transactions rows, requests rows, sum of transactions) of one customer."""
    rows = await pg_rows(
        stores,
        """SELECT (SELECT count(*) FROM transactions WHERE tenant = $1 AND customer_id = $2),
                  (SELECT count(*) FROM requests WHERE tenant = $1 AND customer_id = $2),
                  (SELECT COALESCE(sum(amount_grains), 0) FROM transactions
                   WHERE tenant = $1 AND customer_id = $2)""",
        tenant,
        customer_id,
    )
    return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])


def redis_masters(stores: Stores) -> list[redis.Redis]:
    if stores.topology == "cluster":
        clients = [node.client() for node in stores.redis.nodes]
        return [c for c in clients if c.info("replication")["role"] == "master"]
    if stores.topology == "sentinel":
        return [stores.redis.master().client()]
    return [stores.redis.client()]


def redis_for_keys(stores: Stores) -> Any:
    """A client that routes a key to the node that owns it."""
    if stores.topology == "cluster":
        host, port = stores.redis.startup_nodes[0]
        return RedisCluster(host=host, port=port, decode_responses=True)
    return redis_masters(stores)[0]


def admin_of(tenant: Tenant) -> Principal:
    return Principal(tenant.name, Role.ADMIN, "test", frozenset())


async def assert_integrity_ok(api: Rest, customers: int) -> None:
    report = await api.integrity()
    problems = [(c["customer_id"], c.get("problems")) for c in report["customers"] if not c["ok"]]
    assert (report["ok"], int(report["customers_checked"]), problems) == (True, customers, [])


# -- no overspend ------------------------------------------------------------------------------

EXACT_HOLD = 1_000
EXACT_BALANCE = 100 * EXACT_HOLD + 500
GROW_BALANCE = 50_000
WORKERS = 4


async def test_no_overspend_from_several_processes_on_two_replicas(
    api: Rest,
    topology_service: ServiceProcess,
    second_replica: ServiceProcess,
    topology_tenant: Tenant,
    topology_stores: Stores,
) -> None:
    """500 concurrent Checks on one customer, interleaved with streamed deducts and
    finalizes, from 4 processes over 2 replicas; a second customer's streams grow their
    holds into the same available money the Checks compete for."""
    await api.create_customer("exact", EXACT_BALANCE)
    await api.create_customer("grow", GROW_BALANCE)
    targets = [topology_service.grpc_target, second_replica.grpc_target]
    key = topology_tenant.keys["enforcer"]
    workers = [
        [
            # 5 deducts of 100 completion tokens at 2 grains = 1000: exactly the hold, so
            # finalizing refunds nothing and the approvals are exactly floor(B / hold).
            Plan(targets, key, "exact", "ex", 125, w, deduct_tokens=[100] * 5),
            # 4 x 150 tokens = 1200 grains: the 4th deduct grows the hold by 200.
            Plan(targets, key, "grow", "gr", 50, w, deduct_tokens=[150] * 4),
        ]
        for w in range(WORKERS)
    ]
    results = await asyncio.to_thread(run_workers, workers)
    exact = [r for r in results if r.request_id.startswith("ex-")]
    grow = [r for r in results if r.request_id.startswith("gr-")]
    assert (len(exact), len(grow)) == (500, 200)
    assert [r.error for r in results if r.error] == []

    approved = [r for r in exact if r.approved]
    assert len(approved) == EXACT_BALANCE // EXACT_HOLD == 100
    assert {r.rejection_reason for r in exact if not r.approved} == {"INSUFFICIENT_BALANCE"}
    for r in approved:
        assert r.finalize is not None
        assert (r.reserved_grains, r.killed, r.charged_reported) == (EXACT_HOLD, False, EXACT_HOLD)
        assert (r.finalize["charged_grains"], r.finalize["refunded_grains"]) == (EXACT_HOLD, 0)
        assert (r.finalize["overage_grains"], r.finalize["replayed"]) == (0, False)
    assert await api.balance("exact") == (500, 0, 500)
    tenant = topology_tenant.name
    assert await ledger_counts(topology_stores, tenant, "exact") == (101, 100, 500)
    charged = await pg_rows(
        topology_stores,
        "SELECT sum(actual_cost_grains), max(actual_cost_grains), min(actual_cost_grains) "
        "FROM requests WHERE tenant = $1 AND customer_id = 'exact'",
        tenant,
    )
    assert tuple(charged[0]) == (EXACT_BALANCE - 500, EXACT_HOLD, EXACT_HOLD)

    _assert_grow_outcome(grow)
    balance, reserved, _ = await api.balance("grow")
    total = sum(r.charged_reported for r in grow if r.approved)
    assert 0 <= balance < EXACT_HOLD  # no overspend, and no money left that a Check could take
    assert (total, reserved) == (GROW_BALANCE - balance, 0)
    rows = await pg_rows(
        topology_stores,
        "SELECT request_id, actual_cost_grains, overage_grains FROM requests "
        "WHERE tenant = $1 AND customer_id = 'grow'",
        tenant,
    )
    by_id = {r.request_id: r.charged_reported for r in grow if r.approved}
    assert {r["request_id"]: r["actual_cost_grains"] for r in rows} == by_id
    assert {r["overage_grains"] for r in rows} == {0}
    await assert_integrity_ok(api, 2)


def _assert_grow_outcome(grow: list[Lifecycle]) -> None:
    approved = [r for r in grow if r.approved]
    assert len(approved) < len(grow)  # demand (200 x 1200) is far above the balance
    for r in approved:
        assert r.finalize is not None
        last = r.deducts[-1]
        # A hold never holds less than it consumed; a stream ends charged what it consumed.
        assert all(d["consumed_grains"] <= d["reserved_grains"] for d in r.deducts)
        assert r.finalize["charged_grains"] == r.charged_reported == last["consumed_grains"]
        assert r.finalize["overage_grains"] == 0
        if r.killed:
            assert last["error_code"] == "INSUFFICIENT_BALANCE"
            assert 1_000 <= r.charged_reported < 1_200
        else:
            assert (len(r.deducts), r.charged_reported) == (4, 1_200)
            assert last["reserved_grains"] == 1_200


# -- exactly once ------------------------------------------------------------------------------


async def test_every_mutation_replayed_five_times_changes_the_ledger_once(
    api: Rest, topology_stores: Stores, topology_tenant: Tenant
) -> None:
    tenant = topology_tenant.name
    await api.create_customer("cus", 1_000_000)
    assert await ledger_counts(topology_stores, tenant, "cus") == (1, 0, 1_000_000)

    checks = [await api.check("cus", "r1", 1_000, buffer_multiplier=1.5) for _ in range(5)]
    # Retries answer the original hold and token, and say they are replays.
    assert [c.pop("replayed", False) for c in checks] == [False, True, True, True, True]
    assert checks == [checks[0]] * 5
    assert (checks[0]["reserved_grains"], checks[0]["remaining_balance"]) == ("1500", "998500")
    assert await api.balance("cus") == (1_000_000, 1_500, 998_500)
    token = checks[0]["request_token"]

    # 800 tokens at 2 grains = 1600: the hold grows from 1500 to 1600, once.
    deducts = [await api.deduct("cus", "r1", token, 800, sequence=1) for _ in range(5)]
    assert deducts == [deducts[0]] * 5
    assert (deducts[0]["consumed_grains"], deducts[0]["reserved_grains"]) == ("1600", "1600")
    assert await api.balance("cus") == (1_000_000, 1_600, 998_400)
    assert await ledger_counts(topology_stores, tenant, "cus") == (1, 0, 1_000_000)

    finals = [
        await api.finalize("cus", "r1", actual_prompt_tokens=100, actual_completion_tokens=800)
        for _ in range(5)
    ]
    # 100 x 1 + 800 x 2 = 1700 at the locked prices; the hold (1600) pays first.
    first = {"success": True, "refunded_grains": "0", "final_balance": "998300",
             "charged_grains": "1700", "overage_grains": "0", "replayed": False}  # fmt: skip
    assert finals == [first] + [{**first, "replayed": True}] * 4
    assert await api.balance("cus") == (998_300, 0, 998_300)
    assert await ledger_counts(topology_stores, tenant, "cus") == (2, 1, 998_300)

    for _ in range(5):
        credit = await api.call(
            "POST", "/v1/customers/cus/credits",
            {"amount_grains": "5000", "description": "top-up", "transaction_id": "tx-credit"},
        )  # fmt: skip
        assert (credit["balance"], credit["available"]) == ("1003300", "1003300")
    for _ in range(5):
        debit = await api.call(
            "POST", "/v1/customers/cus/debits",
            {"amount_grains": "3000", "description": "fee", "transaction_id": "tx-debit"},
        )  # fmt: skip
        assert (debit["balance"], debit["available"]) == ("1000300", "1000300")
    assert await ledger_counts(topology_stores, tenant, "cus") == (4, 1, 1_000_300)
    assert await api.balance("cus") == (1_000_300, 0, 1_000_300)
    types = await pg_rows(
        topology_stores,
        "SELECT transaction_type, amount_grains FROM transactions "
        "WHERE tenant = $1 AND customer_id = 'cus' ORDER BY balance_version",
        tenant,
    )
    assert [tuple(r) for r in types] == [
        ("credit", 1_000_000), ("settlement", -1_700), ("credit", 5_000), ("debit", -3_000),
    ]  # fmt: skip
    await assert_integrity_ok(api, 1)


# -- expiry ----------------------------------------------------------------------------------


async def new_customer_with_ttl(
    rt: Runtime, tenant: Tenant, customer_id: str, balance: int, ttl_seconds: int = 1
) -> None:
    await rt.postgres.upsert_customer(
        Customer(tenant.name, customer_id, customer_id, hold_ttl_seconds=ttl_seconds)
    )
    await rt.admin.credit(admin_of(tenant), LedgerCommand(customer_id, balance, "opening"))
    stored = await rt.postgres.get_customer(tenant.name, customer_id)
    assert stored is not None
    await rt.ledger.load_account(stored)


async def wait_for_request(api: Rest, request_id: str) -> dict[str, Any]:
    """The settled request, polled for up to 20 s."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        response = await api.raw("GET", f"/v1/requests/{request_id}", role="reader")
        if response.status_code == 200:
            data = response.json()
            assert isinstance(data, dict)
            return data
        assert response.status_code == 404, response.text
        assert asyncio.get_running_loop().time() < deadline, f"{request_id} never settled"
        await asyncio.sleep(0.2)


async def test_abandoned_hold_expires_and_is_settled_at_its_consumed_amount(
    api: Rest, topology_runtime: Runtime, topology_tenant: Tenant, topology_stores: Stores
) -> None:
    await new_customer_with_ttl(topology_runtime, topology_tenant, "cus", 100_000)
    check = await api.check("cus", "abandoned", 10_000)
    assert (check["approved"], check["reserved_grains"]) == (True, "10000")
    deduct = await api.deduct("cus", "abandoned", check["request_token"], 1_000, sequence=1)
    assert (deduct["success"], deduct["consumed_grains"]) == (True, "2000")
    assert await api.balance("cus") == (100_000, 10_000, 90_000)

    # The client is gone. The service's reaper (every 0.5 s) settles the hold after its TTL.
    settled = await wait_for_request(api, "abandoned")
    assert (settled["status"], settled["consumed_grains"], settled["actual_cost_grains"]) == (
        "expired", "2000", "2000",
    )  # fmt: skip
    assert (settled["refunded_grains"], settled["overage_grains"]) == ("0", "0")
    assert (settled["completion_tokens"], settled["reserved_grains"]) == ("1000", "2000")
    assert await api.balance("cus") == (98_000, 0, 98_000)
    # A late client learns the stream is over; its Finalize, with the provider's cost, is
    # charged the difference once, as an adjustment (docs/adr/0009); retries change nothing.
    late = await api.raw(
        "POST", "/v1/balance/deduct",
        {"customer_id": "cus", "request_id": "abandoned", "request_token": check["request_token"],
         "tokens_consumed": 10, "is_completion": True, "sequence_number": "2"},
        role="enforcer",
    )  # fmt: skip
    assert (late.status_code, late.json()["error"]["reason"]) == (412, "REQUEST_ALREADY_SETTLED")
    for attempt in range(3):
        final = await api.finalize("cus", "abandoned", total_actual_cost_grains="9999")
        assert (final["charged_grains"], final["final_balance"], final["replayed"]) == (
            "9999", "90001", attempt > 0,
        )  # fmt: skip
    assert await ledger_counts(topology_stores, topology_tenant.name, "cus") == (3, 1, 90_001)
    kinds = await pg_rows(
        topology_stores,
        "SELECT transaction_type, amount_grains FROM transactions "
        "WHERE tenant = $1 AND customer_id = 'cus' ORDER BY balance_version",
        topology_tenant.name,
    )
    assert [tuple(r) for r in kinds] == [
        ("credit", 100_000), ("expiry", -2_000), ("adjustment", -7_999),
    ]  # fmt: skip
    await assert_integrity_ok(api, 1)


# -- zero drift after a mixed workload -----------------------------------------------------------


async def test_verify_integrity_reports_zero_drift_after_a_mixed_workload(
    api: Rest, topology_runtime: Runtime, topology_tenant: Tenant
) -> None:
    rt, p = topology_runtime, admin_of(topology_tenant)
    ledger = rt.ledger
    expected: dict[str, int] = {}
    for index, status in enumerate(
        ["COMPLETED_SUCCESS", "KILLED_INSUFFICIENT_BALANCE", "FAILED_ERROR", "FAILED_TIMEOUT"]
    ):
        cid = f"cus{index}"
        await rt.admin.create_customer(p, Customer(topology_tenant.name, cid, cid), 50_000)
        check = await ledger.check(p, CheckCommand(cid, "r", 5_000, 1.0, "cheap"))
        await ledger.deduct(p, DeductCommand(cid, "r", check.request_token, 300, "cheap", True, 1))
        await ledger.finalize(p, FinalizeCommand(cid, "r", status, 10, 300, 0, 0, "cheap"))
        expected[cid] = 50_000 - 610  # 10 x 1 + 300 x 2
    # Credits and debits, replayed.
    for _ in range(2):
        await rt.admin.credit(p, LedgerCommand("cus0", 7_000, "top-up", "c-1"))
        await rt.admin.debit(p, LedgerCommand("cus1", 4_000, "fee", "d-1"))
    expected["cus0"] += 7_000
    expected["cus1"] -= 4_000
    # A provider overage: the hold (1000) and the available money cannot cover 60000.
    await rt.admin.create_customer(p, Customer(topology_tenant.name, "over", "over"), 10_000)
    check = await ledger.check(p, CheckCommand("over", "r", 1_000, 1.0, "cheap"))
    final = await ledger.finalize(
        p, FinalizeCommand("over", "r", "COMPLETED_SUCCESS", 0, 0, 0, 60_000, "cheap")
    )
    assert (final.charged_grains, final.overage_grains, final.final_balance) == (
        60_000, 50_000, -50_000,
    )  # fmt: skip
    expected["over"] = -50_000
    rejected = await ledger.check(p, CheckCommand("over", "r2", 1, 1.0, "cheap"))
    assert (rejected.approved, rejected.rejection_reason) == (False, "INSUFFICIENT_BALANCE")
    # Abandoned holds: one consumed tokens, one did not.
    await new_customer_with_ttl(rt, topology_tenant, "exp", 20_000)
    for rid, tokens in (("a", 500), ("b", 0)):
        check = await ledger.check(p, CheckCommand("exp", rid, 3_000, 1.0, "cheap"))
        if tokens:
            await ledger.deduct(
                p, DeductCommand("exp", rid, check.request_token, tokens, "cheap", True)
            )
    # Both open at once: 3000 + 3000 held.
    assert (await ledger.balance(p, "exp")).reserved == 6_000
    expected["exp"] = 20_000 - 1_000
    await asyncio.sleep(1.2)
    reaper = Reaper(rt.redis, rt.scripts, rt.postgres, ledger)
    for _ in range(50):  # the service's reaper may settle some first; both are idempotent
        await reaper.run_once()
        if (await ledger.balance(p, "exp")).reserved == 0 and len(
            await rt.admin.list_requests(p, "exp", 10)
        ) == 2:
            break
        await asyncio.sleep(0.1)
    settled = {s.request_id: (s.status.value, s.charged_grains) for s in
               await rt.admin.list_requests(p, "exp", 10)}  # fmt: skip
    assert settled == {"a": ("expired", 1_000), "b": ("expired", 0)}
    # One hold stays open: verify-integrity checks held == sum of open holds too.
    await ledger.check(p, CheckCommand("cus2", "open", 2_000, 1.5, "cheap"))
    for cid, balance in expected.items():
        got = await ledger.balance(p, cid)
        assert (cid, got.balance, got.reserved) == (cid, balance, 3_000 if cid == "cus2" else 0)
    report = await api.integrity()
    assert report["ok"] is True, report
    by_id = {c["customer_id"]: c for c in report["customers"]}
    assert {cid: int(c["ledger_sum_grains"]) for cid, c in by_id.items()} == expected
    assert {cid: int(c["redis_balance"]) for cid, c in by_id.items()} == expected
    assert (by_id["cus2"]["redis_held"], by_id["cus2"]["open_holds_sum"]) == ("3000", "3000")


# -- sync ----------------------------------------------------------------------------------------


async def test_sync_rebuilds_a_flushed_redis_from_postgresql(
    api: Rest, topology_stores: Stores
) -> None:
    for index in range(5):
        await api.create_customer(f"c{index}", 10_000 * (index + 1))
        check = await api.check(f"c{index}", "done", 1_000)
        await api.finalize(f"c{index}", "done", total_actual_cost_grains=str(100 * index))
    in_flight = await api.check("c4", "in-flight", 2_000)
    assert in_flight["approved"] is True
    expected = {f"c{index}": 10_000 * (index + 1) - 100 * index for index in range(5)}

    for client in redis_masters(topology_stores):
        client.flushall()
        assert client.dbsize() == 0
    synced = await api.call("POST", "/v1/admin/sync", {})
    assert synced == {"customers_synced": "5", "open_holds_kept": "0"}
    for cid, balance in expected.items():
        assert await api.balance(cid) == (balance, 0, balance)
    await assert_integrity_ok(api, 5)
    # The hold Redis lost is settled directly against the ledger, at the provider's cost.
    final = await api.finalize("c4", "in-flight", total_actual_cost_grains="1234")
    assert (final["charged_grains"], final["refunded_grains"]) == ("1234", "0")
    assert final["final_balance"] == str(expected["c4"] - 1_234)
    left = expected["c4"] - 1_234
    assert await api.balance("c4") == (left, 0, left)
    check = await api.check("c0", "after", 10_000)
    assert (check["approved"], check["remaining_balance"]) == (True, "0")
    await assert_integrity_ok(api, 5)


async def test_sync_keeps_open_holds_and_repairs_a_corrupted_cache(
    api: Rest, topology_stores: Stores, topology_tenant: Tenant
) -> None:
    await api.create_customer("cus", 100_000)
    check = await api.check("cus", "open", 10_000, buffer_multiplier=1.5)
    await api.deduct("cus", "open", check["request_token"], 1_000, sequence=1)
    assert await api.balance("cus") == (100_000, 15_000, 85_000)

    client = redis_for_keys(topology_stores)
    client.hset(account_key(topology_tenant.name, "cus"), mapping={"balance": 7, "held": 3})
    assert await api.balance("cus") == (7, 3, 4)
    report = await api.integrity()
    assert report["ok"] is False
    assert report["customers"][0]["problems"] == [
        "redis balance 7 (version 1) != postgres 100000 (version 1)",
        "redis held 3 != sum of open holds 15000",
    ]
    assert await api.call("POST", "/v1/admin/sync", {}) == {
        "customers_synced": "1", "open_holds_kept": "1",
    }  # fmt: skip
    assert await api.balance("cus") == (100_000, 15_000, 85_000)
    await assert_integrity_ok(api, 1)
    # The kept hold still streams and settles with its token and locked prices.
    deduct = await api.deduct("cus", "open", check["request_token"], 1_000, sequence=2)
    assert (deduct["consumed_grains"], deduct["reserved_grains"]) == ("4000", "15000")
    final = await api.finalize("cus", "open", request_token=check["request_token"])
    assert (final["charged_grains"], final["refunded_grains"], final["final_balance"]) == (
        "4000", "11000", "96000",
    )  # fmt: skip
    assert await api.balance("cus") == (96_000, 0, 96_000)
    await assert_integrity_ok(api, 1)


async def test_sync_never_overwrites_a_settlement_that_commits_meanwhile(
    api: Rest, topology_runtime: Runtime, topology_tenant: Tenant
) -> None:
    """A sync reads PostgreSQL, then writes Redis. A Finalize (on another replica) that
    commits in between must not be undone by the sync's older snapshot: that would hand
    the customer its spent money back. Fault injection: right before the sync writes the
    account, a Finalize runs to completion through the service (bounded wait)."""
    await api.create_customer("cus", 10_000)
    check = await api.check("cus", "r", 1_000)
    rt = topology_runtime
    original_run = rt.redis.run
    finalized: list[asyncio.Task[dict[str, Any]]] = []

    async def run(name: str, keys: Any, args: Any, *, idempotent: bool) -> Any:
        if name == SCRIPT_LOAD_ACCOUNT and not finalized:
            task = asyncio.ensure_future(
                api.finalize("cus", "r", total_actual_cost_grains="1000")
            )  # fmt: skip
            finalized.append(task)
            await asyncio.wait([task], timeout=1.0)  # done, or blocked by the sync
        return await original_run(name, keys, args, idempotent=idempotent)

    rt.redis.run = run  # type: ignore[method-assign]
    try:
        await rt.admin.sync(admin_of(topology_tenant))
    finally:
        rt.redis.run = original_run  # type: ignore[method-assign]
    final = await asyncio.wait_for(finalized[0], timeout=30)
    assert (final["charged_grains"], final["final_balance"]) == ("1000", "9000")
    assert check["approved"] is True
    assert await api.balance("cus") == (9_000, 0, 9_000)
    await assert_integrity_ok(api, 1)


async def test_a_top_up_during_first_load_reaches_the_cache(
    api: Rest, topology_runtime: Runtime, topology_tenant: Tenant
) -> None:
    """A customer's first call loads it into Redis from PostgreSQL. A credit committed
    between that read and the write must not be lost from the hot path."""
    rt, p = topology_runtime, admin_of(topology_tenant)
    await rt.postgres.upsert_customer(Customer(topology_tenant.name, "cus", "cus"))
    await rt.postgres.append_entry(
        tenant=topology_tenant.name, customer_id="cus", transaction_id="open",
        entry_type=EntryType.CREDIT, amount_grains=1_000,
    )  # fmt: skip
    original_run = rt.redis.run
    credited: list[asyncio.Task[dict[str, Any]]] = []

    async def run(name: str, keys: Any, args: Any, *, idempotent: bool) -> Any:
        if name == SCRIPT_LOAD_ACCOUNT and not credited:
            task = asyncio.ensure_future(
                api.call("POST", "/v1/customers/cus/credits",
                         {"amount_grains": "5000", "transaction_id": "top-up"})
            )  # fmt: skip
            credited.append(task)
            await asyncio.wait([task], timeout=1.0)
        return await original_run(name, keys, args, idempotent=idempotent)

    rt.redis.run = run  # type: ignore[method-assign]
    try:
        first = await rt.ledger.balance(p, "cus")
    finally:
        rt.redis.run = original_run  # type: ignore[method-assign]
    await asyncio.wait_for(credited[0], timeout=30)
    assert first.balance in (1_000, 6_000)  # before or after the top-up, never in between
    assert await api.balance("cus") == (6_000, 0, 6_000)
    await assert_integrity_ok(api, 1)
